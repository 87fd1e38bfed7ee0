"""The PromptMesh tab in the 3D viewport's sidebar. Drawing reads state only: no I/O here."""

from __future__ import annotations

import textwrap
from typing import Any

import bpy

from . import from_image, session
from .operators import EXPORT_ITEMS
from .preferences import preferences
from .properties import AUTO_FIELDS, CONNECTION, FINAL_STATES, JOB_STATES, LIVE_STATES, NOVEL_VIEWS
from .shared.vocab import Stage

# Blender icon ids from our enum tables (Any: the stubs want each id as a literal).
CONNECTION_ICONS: dict[str, Any] = {c[0]: c[3] for c in CONNECTION}
CONNECTION_NAMES = {c[0]: c[1] for c in CONNECTION}
STATE_ICONS: dict[str, Any] = {s[0]: s[3] for s in JOB_STATES}


def wrapped(layout: Any, text: str, context: Any, icon: str = "NONE") -> None:
    """`text` as labels that fit the sidebar's width (a long label is cut off, not wrapped)."""
    width = max(20, int(context.region.width / 7) - 4) if context.region else 40
    for i, line in enumerate(textwrap.wrap(text, width) or [""]):
        layout.label(text=line, icon=icon if i == 0 else "BLANK1")


class PromptMeshPanel(bpy.types.Panel):
    """Where every panel of ours lives: the 3D viewport's sidebar, in our own tab (not registered)."""

    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "PromptMesh"


class PROMPTMESH_PT_main(PromptMeshPanel):
    bl_idname = "PROMPTMESH_PT_main"
    bl_label = "PromptMesh"

    def draw(self, context):
        layout, settings, st = self.layout, context.scene.promptmesh, session.state(context)
        row = layout.row(align=True)
        badge = st.device if st.connection == "ONLINE" else CONNECTION_NAMES[st.connection]
        row.label(text=badge, icon=CONNECTION_ICONS[st.connection])
        row.operator("promptmesh.connect", text="", icon="FILE_REFRESH")
        layout.row(align=True).prop(settings, "source", expand=True)
        if settings.source == "IMAGE":
            layout.template_ID(settings, "image", open="promptmesh.open_image")
            shown = from_image.editor_image(context) if settings.image is None else None
            if shown is not None:
                layout.label(text=f"Image Editor's: {shown.name}", icon="IMAGE_DATA")
            layout.prop(settings, "elevation")
            if NOVEL_VIEWS or settings.novel_view:  # only where the backend offers one (or the scene names one)
                layout.prop(settings, "novel_view", icon="VIEW_CAMERA")
        layout.prop(settings, "prompt", text="")
        problem = session.prompt_problem(settings)
        if problem:  # said under the field, before anything is sent
            col = layout.column(align=True)
            col.alert = True
            wrapped(col, problem, context, icon="ERROR")
        layout.prop(settings, "negative")
        layout.prop(settings, "model_choice", text="", icon="OUTLINER_DATA_LIGHTPROBE")
        row = layout.row(align=True)
        row.prop(settings, "seed")
        row.prop(settings, "lock_seed", text="", icon="LOCKED" if settings.lock_seed else "UNLOCKED")
        row.prop(settings, "quality", text="")
        layout.prop(settings, "variations")
        row = layout.row(align=True)
        row.scale_y = 1.4
        row.operator("promptmesh.generate", icon="SHADERFX")
        row.operator("promptmesh.cancel", text="", icon="CANCEL")
        layout.operator("promptmesh.texture_selected", icon="TEXTURE")
        active = st.job(st.active_job)
        if active is not None and active.state not in FINAL_STATES:
            counted = active.total and st.stage in (Stage.OPTIMISING, Stage.REFINING, Stage.TEXTURING)
            text = f"{st.stage} {active.step}/{active.total}" if counted else st.stage
            layout.progress(factor=st.progress, type="BAR", text=text)
            if st.eta:
                layout.label(text=st.eta, icon="TIME")
        layout.prop(settings, "show_proxy")
        if st.preview_step and session.preview().icon_id:
            layout.template_icon(icon_value=session.preview().icon_id, scale=8.0)
        if st.status:
            box = layout.box()
            box.alert = st.status_is_error
            wrapped(box.column(align=True), st.status, context, icon="ERROR" if st.status_is_error else "INFO")


class PROMPTMESH_PT_advanced(PromptMeshPanel):
    bl_label = "Advanced"
    bl_parent_id = "PROMPTMESH_PT_main"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context):
        layout, settings = self.layout, context.scene.promptmesh
        layout.use_property_split = True
        layout.use_property_decorate = False  # no keyframe dots: none of these animate
        for name in AUTO_FIELDS:  # "Auto" (from the quality preset and the model), or the artist's own value
            auto = getattr(settings, f"auto_{name}")
            row = layout.row(align=True, heading=settings.bl_rna.properties[name].name)
            row.prop(settings, f"auto_{name}", text="Auto", toggle=True)
            sub = row.row(align=True)
            sub.enabled = not auto
            sub.prop(settings, name, text="")
        for name in ("objective", "texture_size", "preview_every", "proxy_every", "device", "import_when_done"):
            layout.prop(settings, name)


class PROMPTMESH_PT_finishing(PromptMeshPanel):
    """Kept in the add-on preferences: every file's imports are finished alike."""

    bl_label = "Finishing on Import"
    bl_parent_id = "PROMPTMESH_PT_main"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context):
        layout, prefs = self.layout, preferences(context)
        layout.use_property_split = True
        layout.use_property_decorate = False
        layout.prop(prefs, "finish_size")
        layout.prop(prefs, "finish_remesh")
        sub = layout.row()
        sub.enabled = prefs.finish_remesh != "NONE"
        sub.prop(prefs, "finish_faces")
        row = layout.row(align=True, heading="Smooth by Angle")
        row.prop(prefs, "finish_smooth", text="")
        sub = row.row(align=True)
        sub.enabled = prefs.finish_smooth
        sub.prop(prefs, "finish_angle", text="")


class PROMPTMESH_UL_jobs(bpy.types.UIList):
    def draw_item(self, context, layout, data, item, icon, active_data, active_property, index=0, flt_flag=0):
        row = layout.row(align=True)
        text = item.prompt or item.job
        row.label(text=f"{text} on {item.target}" if item.target else text, icon=STATE_ICONS[item.state])
        row.label(text=f"seed {item.seed}")
        if item.state == "RUNNING" and item.total:
            row.label(text=f"{item.step}/{item.total}")
        if item.state in LIVE_STATES:
            row.operator("promptmesh.cancel", text="", icon="CANCEL").job = item.job or item.request
        sub = row.row(align=True)
        sub.enabled = item.state == "DONE"
        sub.operator("promptmesh.import_job", text="", icon="IMPORT").job = item.job
        sub.operator("promptmesh.open_folder", text="", icon="FILE_FOLDER").job = item.job


class PROMPTMESH_PT_history(PromptMeshPanel):
    bl_label = "Jobs"
    bl_parent_id = "PROMPTMESH_PT_main"

    def draw(self, context):
        st = session.state(context)
        self.layout.template_list("PROMPTMESH_UL_jobs", "", st, "jobs", st, "jobs_index", rows=3)
        if 0 <= st.jobs_index < len(st.jobs) and st.jobs[st.jobs_index].message:
            self.layout.label(text=st.jobs[st.jobs_index].message, icon="INFO")


class PROMPTMESH_PT_export(PromptMeshPanel):
    bl_label = "Export Selected"
    bl_parent_id = "PROMPTMESH_PT_main"

    def draw(self, context):
        col = self.layout.column(align=True)
        for fmt, label, _ in EXPORT_ITEMS:
            col.operator("promptmesh.export", text=label, icon="EXPORT").format = fmt


CLASSES = (PROMPTMESH_PT_main, PROMPTMESH_PT_advanced, PROMPTMESH_PT_finishing,
           PROMPTMESH_UL_jobs, PROMPTMESH_PT_history, PROMPTMESH_PT_export)

# The stubs declare the factory as returning None; it returns (register, unregister).
register, unregister = bpy.utils.register_classes_factory(CLASSES)  # type: ignore[misc]
