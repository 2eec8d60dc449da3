"""Files on disk: PEFT adapter folders, safetensors, .onnx_adapter, the export manifest, atomic writes."""
