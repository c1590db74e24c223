"""Visual question answering: the same runner, registry and run folder as captioning, a second task.

``task: vqa`` in a config (``config.py: VQARunConfig``) runs the stages of ``tasks.VQA_STAGES``:
the shared image ``embed``, question vectors, answerer kinds (``answerers.py``, ``mllm.py``), answer
fusers (``fuse.py``), metrics (``metrics.py``) and submission files. Readers: ``data.py``.
"""
