"""medcap: diagnostic captions for medical images with a multi-stage ensemble."""

from medcap.version import __version__

__all__ = ["Answerer", "Captioner", "answer_question", "caption", "__version__"]


def __getattr__(name: str):
    # the API pulls in torch and friends: import it only when it is used, so `import medcap` stays light
    if name in ("Captioner", "caption"):
        from medcap import api

        return getattr(api, name)
    if name in ("Answerer", "answer_question"):  # the VQA task (medcap/vqa/api.py)
        from medcap.vqa import api as vqa_api

        return getattr(vqa_api, name)
    raise AttributeError(f"module 'medcap' has no attribute {name!r}")
