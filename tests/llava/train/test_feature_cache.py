"""--vision_feature_cache_gb: a frozen-tower run with the cache ends with the same weights, bit for bit, as one
without it, in fewer tower calls; a trained tower (full or LoRA) is refused; a full cache keeps serving."""
import torch

from llava.model.builder import build_small_model
from llava.train.feature_cache import VisionFeatureCache
from tests.llava.train.conftest import assert_same_weights, common, final_weights, one_error_line

FROZEN = ["--mm_tunable_parts", "mm_mlp_adapter,mm_language_model", "--num_train_epochs", "3",
          "--per_device_train_batch_size", "4"]


def test_cached_run_equals_uncached_run(data8, tmp_path, train_main):
    code, err = train_main(*common(data8, tmp_path / "plain", *FROZEN))
    assert code == 0, err
    code, err = train_main(*common(data8, tmp_path / "cached", *FROZEN, "--vision_feature_cache_gb", "1"))
    assert code == 0, err
    assert_same_weights(final_weights(tmp_path / "plain"), final_weights(tmp_path / "cached"))
    # the 8 records ask about 4 images: each image is encoded once, then served 5 more times over 3 epochs
    assert '"vision_feature_cache": {"entries": 4, "gb": 0.003, "hits": 20, "misses": 4}' in err


def test_trained_vision_tower_is_refused(data8, tmp_path, train_main):
    code, err = train_main(*common(data8, tmp_path / "a", "--max_steps", "1", "--vision_feature_cache_gb", "1"))
    assert code == 2 and "needs a frozen vision tower" in one_error_line(err)
    code, err = train_main(*common(data8, tmp_path / "b", "--max_steps", "1", "--vision_feature_cache_gb", "1",
                                   "--lora_enable", "True"))
    assert code == 2 and "needs a frozen vision tower" in one_error_line(err)
    assert not (tmp_path / "a" / "final").exists() and not (tmp_path / "b" / "final").exists()


def test_negative_size_is_refused(data8, tmp_path, train_main):
    code, err = train_main(*common(data8, tmp_path / "a", *FROZEN, "--vision_feature_cache_gb", "-1"))
    assert code == 2 and "--vision_feature_cache_gb must be >= 0" in one_error_line(err)


def test_same_pixels_hit_other_pixels_miss_and_a_full_cache_still_serves():
    _, model = build_small_model()
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(False)
    a, b = torch.rand(1, 3, 384, 384), torch.rand(1, 3, 384, 384)
    cache = VisionFeatureCache(model, max_bytes=729 * 64 * 4)  # room for one view's features
    first = model.vision_features(a, False)
    assert model.vision_features(a.clone(), False) is first  # the key is the pixels, not the tensor object
    other = model.vision_features(b, False)  # does not fit: computed, not stored
    assert cache.stats() == {"entries": 1, "gb": 0.0, "hits": 1, "misses": 2}
    assert model.vision_features(b, False) is not other and torch.equal(model.vision_features(b, False).features,
                                                                          other.features)
    with_attn = model.vision_features(a, True)  # attention outputs are another key
    assert with_attn.attn_received is not None and cache.stats()["misses"] == 5
    cache.uninstall()
    assert "vision_features" not in model.__dict__
