"""Add-on preferences: where the backend is, its CURVE keys, and how to start it locally.

Stored in Blender's user preferences, never in a .blend file.
"""

from __future__ import annotations

from typing import cast

import bpy
from bpy.props import BoolProperty, EnumProperty, FloatProperty, IntProperty, StringProperty

from . import backend_process


class PROMPTMESH_AP_preferences(bpy.types.AddonPreferences):
    bl_idname = __package__

    endpoint: StringProperty(name="Backend", default="tcp://127.0.0.1:5555",
                             description="ZeroMQ endpoint of `promptmesh serve`")
    timeout: FloatProperty(name="Timeout", default=5.0, min=0.5, max=120.0, unit="TIME_ABSOLUTE",
                           description="Seconds to wait for the backend's answer before calling it unreachable")
    server_key: StringProperty(name="Server Public Key", subtype="PASSWORD",
                               description="The server's CURVE public key (Z85, 40 characters); empty: no encryption")
    client_public_key: StringProperty(name="Client Public Key", subtype="PASSWORD")
    client_secret_key: StringProperty(name="Client Secret Key", subtype="PASSWORD")
    backend_command: StringProperty(
        name="Backend Command", description="How to start the backend here, in its own Python environment, e.g. "
        "/home/me/promptmesh/.venv/bin/promptmesh serve (--bind is added from the endpoint)")

    # Finishing on import (addon/finishing.py): set in the panel, kept here so every file gets them.
    finish_size: FloatProperty(name="Size", default=1.0, min=0.0, soft_max=10.0, unit="LENGTH",
                               description="The imported object's largest dimension; 0: as the backend made it")
    finish_remesh: EnumProperty(name="Remesh", default="NONE", items=[
        ("NONE", "None", "Keep the backend's triangles"),
        ("QUADRIFLOW", "Quads (QuadriFlow)", "Blender's QuadriFlow quad remesh; colours and UVs carried over")])
    finish_faces: IntProperty(name="Faces", default=5000, min=100, max=200_000,
                              description="About how many quads QuadriFlow makes")
    finish_smooth: BoolProperty(name="Smooth by Angle", default=True,
                                description="Smooth shading, with edges sharper than the angle kept sharp")
    finish_angle: FloatProperty(name="Angle", default=0.5236, min=0.0, max=3.1416, subtype="ANGLE",
                                description="Edges whose faces meet at more than this stay sharp")

    def curve(self) -> tuple[bytes | None, tuple[bytes, bytes] | None]:
        """(server key, client key pair) as the client wants them; Nones without keys."""
        if not self.server_key.strip():
            return None, None
        pair = None
        if self.client_public_key.strip() and self.client_secret_key.strip():
            pair = (self.client_public_key.strip().encode(), self.client_secret_key.strip().encode())
        return self.server_key.strip().encode(), pair

    def draw(self, context: bpy.types.Context) -> None:
        layout = self.layout
        layout.prop(self, "endpoint")
        layout.prop(self, "timeout")
        box = layout.box()
        box.label(text="Encryption (remote backends)", icon="LOCKED")
        box.prop(self, "server_key")
        box.prop(self, "client_public_key")
        box.prop(self, "client_secret_key")
        box = layout.box()
        box.label(text="Local backend", icon="CONSOLE")
        box.prop(self, "backend_command")
        row = box.row()
        running = backend_process.running()
        row.operator("promptmesh.backend_start", icon="PLAY")
        row.operator("promptmesh.backend_stop", icon="PAUSE")
        row.label(text="running" if running else "stopped")
        log = context.window_manager.promptmesh.backend_log
        if log:
            col = box.column(align=True)
            col.alert = True
            for line in log.splitlines():
                col.label(text=line)


def preferences(context: bpy.types.Context | None = None) -> PROMPTMESH_AP_preferences:
    return cast(PROMPTMESH_AP_preferences, (context or bpy.context).preferences.addons[__package__].preferences)


def register() -> None:
    bpy.utils.register_class(PROMPTMESH_AP_preferences)


def unregister() -> None:
    bpy.utils.unregister_class(PROMPTMESH_AP_preferences)
