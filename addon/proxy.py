"""The live 3D proxy: one temporary object at the 3D cursor showing the coarse mesh a running
job sends, updated in place, gone when the job ends, and never saved in a .blend.

It lives in a collection of its own, cannot be selected, and is found by name each time (an
undo step can replace the data-blocks under a held reference).
"""

from __future__ import annotations

from typing import Any

import bpy
import numpy as np

from .shared.blender_io import fill_mesh, standing, vertex_color_material

NAME = "PromptMesh Proxy"
_live = False  # a job is showing its proxy now


def update(context: Any, vertices: np.ndarray, faces: np.ndarray, colors_u8: np.ndarray) -> Any:
    """Show this coarse mesh (float16 positions, uint8 sRGB colours) standing on the 3D cursor."""
    global _live
    _live = True
    obj = bpy.data.objects.get(NAME)
    if obj is None:
        collection = bpy.data.collections.get(NAME) or bpy.data.collections.new(NAME)
        if collection.name not in context.scene.collection.children:
            context.scene.collection.children.link(collection)
        mesh = bpy.data.meshes.new(NAME)
        mesh.materials.append(bpy.data.materials.get(NAME) or vertex_color_material(NAME))
        obj = bpy.data.objects.new(NAME, mesh)
        obj.hide_select = True
        collection.objects.link(obj)
    fill_mesh(obj.data, standing(vertices.astype(np.float32)), faces, colors_u8.astype(np.float32) / 255.0)
    obj.location = context.scene.cursor.location
    return obj


def remove() -> None:
    """Take the proxy and everything made for it out of the file."""
    global _live
    _live = False
    _remove_blocks()


def _remove_blocks() -> None:
    for collection, name in ((bpy.data.objects, NAME), (bpy.data.meshes, NAME), (bpy.data.materials, NAME),
                             (bpy.data.collections, NAME)):
        block = collection.get(name)
        if block is not None:
            collection.remove(block)


@bpy.app.handlers.persistent
def _before_save(*_: Any) -> None:
    _remove_blocks()  # the next update brings it back


@bpy.app.handlers.persistent
def _after_undo(*_: Any) -> None:
    """An undo step taken while a job ran holds a proxy: undoing to it after the job must not
    bring that proxy back."""
    if not _live:
        _remove_blocks()


HANDLERS = ((bpy.app.handlers.save_pre, _before_save), (bpy.app.handlers.undo_post, _after_undo),
            (bpy.app.handlers.redo_post, _after_undo))


def register() -> None:
    for handlers, handler in HANDLERS:
        if handler not in handlers:
            handlers.append(handler)


def unregister() -> None:
    for handlers, handler in HANDLERS:
        if handler in handlers:
            handlers.remove(handler)
    remove()
