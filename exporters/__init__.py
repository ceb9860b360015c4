"""Exporters (installed as `slimgpt_deploy.exporters`): slim checkpoint -> deployable artifacts.

Planned here: the vLLM-ready directory and the ONNX export with its verification
(issues 3 and 4). Nothing is exported yet; the slim checkpoint written by
`slimgpt-deploy prune` is the current deliverable.
"""
