import io
import json
import subprocess

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from helpers import glb_accessor, glb_parts, glb_view, textured_sphere
from promptmesh.backend.export import linear_to_srgb, read_mesh, srgb_to_linear, write_mesh
from promptmesh.backend.mesh import MeshError, auto_threshold, extract_mesh

RED = (0.86, 0.10, 0.10)


def sphere_density(radius=0.5, centre=(0.0, 0.0, 0.0)):
    c = torch.tensor(centre)
    return lambda x: 1000.0 * ((x - c).norm(dim=-1) < radius).float()


def constant_albedo(rgb=RED):
    return lambda x: torch.tensor(rgb).expand(len(x), 3)


@pytest.mark.parametrize("resolution", [64, 128])
def test_marching_cubes_of_a_sphere_is_a_sphere(resolution):
    mesh = extract_mesh(sphere_density(0.5), constant_albedo(), resolution=resolution)
    cell = 2.0 / (resolution - 1)
    r = np.linalg.norm(mesh.vertices, axis=1)
    assert np.abs(r - 0.5).max() < cell
    tm = trimesh.Trimesh(mesh.vertices, mesh.faces, process=False)
    assert tm.is_watertight and tm.volume > 0  # closed and wound outward
    assert (np.sum(mesh.normals * mesh.vertices, axis=1) > 0).all()
    assert np.allclose(mesh.colors, RED, atol=1e-6)


def test_floaters_are_dropped_and_decimation_keeps_the_budget():
    main = sphere_density(0.5)
    speck = sphere_density(0.08, (0.8, 0.0, 0.0))
    mesh = extract_mesh(lambda x: main(x) + speck(x), constant_albedo(), resolution=96)
    assert np.linalg.norm(mesh.vertices, axis=1).max() < 0.6
    smooth = lambda x: 100.0 * torch.sigmoid((0.5 - x.norm(dim=-1)) * 20)  # noqa: E731  like a trained field
    small = extract_mesh(smooth, constant_albedo(), resolution=96, max_faces=1000)
    assert 500 <= len(small.faces) <= 1000


def test_the_walls_of_a_cavity_inside_the_object_are_dropped():
    """A NeRF's density may dip inside a solid it only saw from outside: marching cubes then
    gives an inside-out shell within the surface, which no camera sees."""
    hollow = lambda x: 1000.0 * ((x.norm(dim=-1) < 0.5) & (x.norm(dim=-1) > 0.3)).float()  # noqa: E731
    mesh = extract_mesh(hollow, constant_albedo(), resolution=96)
    r = np.linalg.norm(mesh.vertices, axis=1)
    assert r.min() > 0.45 and np.abs(r - 0.5).max() < 2.0 / 95
    tm = trimesh.Trimesh(mesh.vertices, mesh.faces, process=False)
    assert tm.is_watertight and tm.volume > 0
    # a second solid beside it, as large, stays
    two = lambda x: hollow(x) + 1000.0 * ((x - torch.tensor([0.0, 0.0, -0.75])).norm(dim=-1) < 0.2).float()  # noqa: E731
    both = extract_mesh(two, constant_albedo(), resolution=96)
    assert len(trimesh.Trimesh(both.vertices, both.faces).split(only_watertight=False)) == 2


def test_empty_field_is_an_error_with_advice():
    with pytest.raises(MeshError, match="steps"):
        extract_mesh(lambda x: torch.zeros(len(x)), constant_albedo(), resolution=32)
    with pytest.raises(MeshError):
        extract_mesh(lambda x: torch.full((len(x),), 1e4), constant_albedo(), resolution=32)


def test_threshold_falls_back_for_a_faint_field():
    faint = lambda x: 0.4 * auto_threshold() * (x.norm(dim=-1) < 0.5).float()  # noqa: E731
    mesh = extract_mesh(faint, constant_albedo(), resolution=48)
    assert abs(np.linalg.norm(mesh.vertices, axis=1).mean() - 0.5) < 0.05


BLUE, OFF_WHITE = (0.12, 0.22, 0.88), (0.95, 0.96, 0.99)


def test_surface_coloured_like_a_solid_background_takes_the_colour_around_it():
    """SDS against a white background cannot see white surface: a blue ball's white underside
    is recoloured from the blue around it; without a solid background it is left as it is."""
    def albedo(x):
        return torch.where((x[:, 2] > -0.25)[:, None], torch.tensor(BLUE), torch.tensor(OFF_WHITE))

    as_is = extract_mesh(sphere_density(0.5), albedo, resolution=64)
    underside = as_is.vertices[:, 2] < -0.3
    assert np.allclose(as_is.colors[underside], OFF_WHITE, atol=1e-6)
    mended = extract_mesh(sphere_density(0.5), albedo, resolution=64, background=(1.0, 1.0, 1.0))
    assert np.abs(mended.colors - BLUE).max() < 1e-4
    on_black = extract_mesh(sphere_density(0.5), albedo, resolution=64, background=(0.0, 0.0, 0.0))
    assert np.allclose(on_black.colors[underside], OFF_WHITE, atol=1e-6)  # white shows against black


def test_a_piece_of_nothing_but_the_background_colour_keeps_it():
    """Nothing to take a colour from: a separate white ball stays white beside a blue one."""
    blue, white = sphere_density(0.35, (-0.45, 0.0, 0.0)), sphere_density(0.35, (0.45, 0.0, 0.0))
    def albedo(x):
        return torch.where((x[:, 0] < 0)[:, None], torch.tensor(BLUE), torch.tensor(OFF_WHITE))

    mesh = extract_mesh(lambda x: blue(x) + white(x), albedo, resolution=64, background=(1.0, 1.0, 1.0))
    left = mesh.vertices[:, 0] < 0
    assert left.any() and (~left).any()
    assert np.allclose(mesh.colors[left], BLUE, atol=1e-6) and np.allclose(mesh.colors[~left], OFF_WHITE, atol=1e-6)


@pytest.fixture(scope="module")
def cone_mesh():
    """An asymmetric object: a cone whose tip points up (+Z) and sits at the front (-Y)."""
    def density(x):
        h = (0.5 - x[:, 2]) / 1.0  # 0 at the tip z=0.5, 1 at the base z=-0.5
        r = torch.sqrt(x[:, 0] ** 2 + (x[:, 1] + 0.1) ** 2)
        return 1000.0 * ((h > 0) & (h < 1) & (r < 0.4 * h)).float()
    return extract_mesh(density, constant_albedo(), resolution=64)


def test_glb_passes_the_khronos_validator_with_linear_colours_and_y_up(cone_mesh, tmp_path, gltf_validator):
    path = write_mesh(cone_mesh, tmp_path / "cone.glb")
    report = json.loads(subprocess.run(gltf_validator + [str(path)], capture_output=True, text=True, check=True).stdout)
    assert report["issues"]["numErrors"] == 0, report["issues"]["messages"]
    assert report["info"]["totalTriangleCount"] == len(cone_mesh.faces)
    scene = trimesh.load(path)
    geom = next(iter(scene.geometry.values()))
    top = geom.vertices[:, 1].argmax()  # Y up in glTF
    assert geom.vertices[top, 1] > 0.45
    assert np.allclose(geom.vertices[:, 2].mean(), 0.1, atol=0.03)  # our front (-Y) becomes glTF front (+Z)
    colour = geom.visual.vertex_colors[:, :3].mean(0) / 255
    assert np.allclose(colour, srgb_to_linear(np.array(RED)), atol=2 / 255)


def test_ply_is_z_up_and_obj_y_up_both_srgb(cone_mesh, tmp_path):
    ply = trimesh.load(write_mesh(cone_mesh, tmp_path / "cone.ply"), process=False)
    assert ply.vertices[:, 2].max() > 0.45 and np.allclose(ply.vertices[:, 1].mean(), -0.1, atol=0.03)
    assert np.allclose(ply.visual.vertex_colors[:, :3].mean(0) / 255, RED, atol=1 / 255)
    obj_text = write_mesh(cone_mesh, tmp_path / "cone.obj").read_text()
    verts = np.array([[float(v) for v in line.split()[1:]] for line in obj_text.splitlines() if line.startswith("v ")])
    assert verts.shape[1] == 6  # x y z r g b
    assert verts[:, 1].max() > 0.45
    assert np.allclose(verts[:, 3:].mean(0), RED, atol=1 / 255)
    assert len(verts) == len(cone_mesh.vertices)


@pytest.mark.parametrize("fmt", ["glb", "ply", "obj", "npz"])
def test_read_mesh_undoes_each_formats_axes_and_colour_space(cone_mesh, tmp_path, fmt):
    path = tmp_path / f"cone.{fmt}"
    if fmt == "npz":
        np.savez(path, vertices=cone_mesh.vertices, faces=cone_mesh.faces, colors=cone_mesh.colors, normals=cone_mesh.normals)
    else:
        write_mesh(cone_mesh, path)
    back = read_mesh(path)
    assert back.faces.shape == cone_mesh.faces.shape
    assert np.abs(back.vertices - cone_mesh.vertices).max() < 1e-5  # Z up, front -Y again
    # sRGB again; GLB holds 8-bit linear colour, whose steps near black are ~2.5/255 in sRGB
    assert np.abs(back.colors.mean(0) - cone_mesh.colors.mean(0)).max() <= (3 if fmt == "glb" else 1) / 255


@pytest.fixture(scope="module")
def textured():
    return textured_sphere(128)


def texels_at(texture: np.ndarray, uv_top_left: np.ndarray) -> np.ndarray:
    """The texture's nearest texels at UVs whose origin is the top left (glTF's), in [0, 1]."""
    h, w = texture.shape[:2]
    col = np.clip(np.floor(uv_top_left[:, 0] * w), 0, w - 1).astype(int)
    row = np.clip(np.floor(uv_top_left[:, 1] * h), 0, h - 1).astype(int)
    return texture[row, col] / 255.0


def test_the_texture_holds_the_vertex_colours_where_the_uvs_point(textured):
    error = np.abs(texels_at(textured.texture, textured.uvs * [1, -1] + [0, 1]) - textured.colors).max(1)
    assert np.median(error) < 0.02 and np.percentile(error, 99) < 0.06  # a flipped V would be ~0.3 off


def test_a_mesh_charted_in_pieces_keeps_every_face_in_one_atlas_without_overlaps():
    """20k faces go to xatlas as several wedges: one atlas, charts not overlapping (the texels
    covered equal the UV area), every face kept, and the texture right under each vertex."""
    import trimesh

    from promptmesh.backend.texture import _pieces, bake, rasterize_uv
    from promptmesh.shared.result import Mesh

    sphere = trimesh.creation.icosphere(5)
    v, faces = sphere.vertices.astype(np.float32), sphere.faces.astype(np.int32)
    assert len(_pieces(v, faces)) > 4
    baked = bake(Mesh(v, faces, 0.5 + 0.5 * v, v.copy()), 512)
    corners = baked.uvs[baked.faces] * 512
    edges1, edges2 = corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]
    area = 0.5 * np.abs(edges1[:, 0] * edges2[:, 1] - edges1[:, 1] * edges2[:, 0]).sum()
    face_of, _ = rasterize_uv(baked.uvs, baked.faces, 512)
    assert abs((face_of >= 0).sum() / area - 1) < 0.01  # overlapping charts would cover less than their area

    def face_set(vertices: np.ndarray, f: np.ndarray) -> np.ndarray:
        return np.sort(np.sort(vertices[f].reshape(len(f), 9), 1), 0)

    assert np.array_equal(face_set(baked.vertices, baked.faces), face_set(v, faces))
    error = np.abs(texels_at(baked.texture, baked.uvs * [1, -1] + [0, 1]) - baked.colors).max(1)
    assert np.median(error) < 0.02 and np.percentile(error, 99) < 0.06


def test_textured_glb_passes_the_validator_with_texture_uvs_and_colours(textured, tmp_path, gltf_validator):
    path = write_mesh(textured, tmp_path / "sphere.glb")
    report = json.loads(subprocess.run(gltf_validator + [str(path)], capture_output=True, text=True, check=True).stdout)
    assert report["issues"]["numErrors"] == 0, report["issues"]["messages"]
    assert report["issues"]["numWarnings"] == 0, report["issues"]["messages"]
    (image_info,) = [r["image"] for r in report["info"]["resources"] if r["pointer"] == "/images/0"]
    assert (image_info["width"], image_info["format"], image_info["transfer"]) == (128, "rgb", "srgb")

    gltf, binary = glb_parts(path)
    (primitive,) = gltf["meshes"][0]["primitives"]
    attributes = primitive["attributes"]
    # the colours travel as _COLOR_0: a COLOR_0 would multiply the texture (squared colours)
    assert {"POSITION", "NORMAL", "_COLOR_0", "TEXCOORD_0"} <= attributes.keys() and "COLOR_0" not in attributes
    pbr = gltf["materials"][primitive["material"]]["pbrMetallicRoughness"]
    assert pbr["metallicFactor"] == 0.0
    texture = gltf["textures"][pbr["baseColorTexture"]["index"]]
    image = gltf["images"][texture["source"]]
    assert image["mimeType"] == "image/png" and pbr["baseColorTexture"].get("texCoord", 0) == 0
    png = np.asarray(Image.open(io.BytesIO(glb_view(gltf, binary, image["bufferView"]))))
    assert np.array_equal(png, textured.texture)  # embedded as baked, sRGB bytes untouched

    uv = glb_accessor(gltf, binary, attributes["TEXCOORD_0"])  # glTF: origin at the top left
    assert np.allclose(uv, textured.uvs * [1, -1] + [0, 1], atol=1e-6)
    colour = linear_to_srgb(glb_accessor(gltf, binary, attributes["_COLOR_0"]))
    assert np.abs(colour - textured.colors).max() < 1e-5  # float linear, back in sRGB
    error = np.abs(texels_at(png, uv) - colour).max(1)  # the texture under each vertex is its colour
    assert np.median(error) < 0.02 and np.percentile(error, 99) < 0.06


def test_textured_obj_has_its_mtl_and_png_beside_it(textured, tmp_path):
    path = write_mesh(textured, tmp_path / "sphere.obj")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sphere.mtl", "sphere.obj", "sphere.png"]
    lines = path.read_text().splitlines()
    tags = [line.split()[0] for line in lines]
    assert lines[0] == "mtllib sphere.mtl" and "usemtl sphere" in lines
    assert lines.index("usemtl sphere") < tags.index("f")
    assert (tags.count("v"), tags.count("vt"), tags.count("vn")) == (len(textured.vertices),) * 3
    assert tags.count("f") == len(textured.faces)
    vt = np.array([line.split()[1:] for line in lines if line.startswith("vt ")], float)
    assert np.allclose(vt, textured.uvs, atol=1e-7)  # OBJ's UV origin is the bottom left, as ours
    first_face = lines[tags.index("f")].split()[1:]
    assert first_face == [f"{i + 1}/{i + 1}/{i + 1}" for i in textured.faces[0]]
    mtl = (tmp_path / "sphere.mtl").read_text().splitlines()
    assert "newmtl sphere" in mtl and "map_Kd sphere.png" in mtl
    assert np.array_equal(np.asarray(Image.open(tmp_path / "sphere.png")), textured.texture)


@pytest.mark.parametrize("fmt", ["glb", "obj", "npz"])
def test_read_mesh_gives_back_the_texture_and_uvs(textured, tmp_path, fmt):
    path = tmp_path / f"sphere.{fmt}"
    if fmt == "npz":
        from promptmesh.shared.result import write_npz

        write_npz(textured, path)
    else:
        write_mesh(textured, path)
    back = read_mesh(path)
    assert np.abs(back.vertices - textured.vertices).max() < 1e-5
    assert np.allclose(back.uvs, textured.uvs, atol=1e-6) and np.array_equal(back.texture, textured.texture)
    # an OBJ's vertex colours come back sampled from its texture (trimesh drops `v` colours beside one)
    assert np.abs(back.colors - textured.colors).max() < (0.05 if fmt == "obj" else 0.03)


def test_ply_keeps_vertex_colours_only(textured, tmp_path):
    back = read_mesh(write_mesh(textured, tmp_path / "sphere.ply"))
    assert back.texture is None and np.abs(back.colors - textured.colors).max() <= 1 / 255
    assert [p.name for p in tmp_path.iterdir()] == ["sphere.ply"]
