"""The stateless tool service: image_zoom_in_tool (docs/design.md, "Crop rules"), image_rotate_tool, a registry.

Pure core (no Ray): `services.tools.zoom.crop_image`, `services.tools.registry.execute_tool`
(never raises), `tool_schemas`, `ToolResult`. Serve adapter: `services.tools.app:build_app`
(deployment `ToolService`, handle method `call(name, image_arg(ref), arguments)`).
"""
