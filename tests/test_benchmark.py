"""tools/benchmark.py helpers: the model each contender is built as, and the MACs behind its "peak %"."""
import sys
from pathlib import Path

import pytest
import timm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'tools'))
import benchmark  # noqa: E402


def test_gmacs_counts_a_forward_pass():
    # Swin-T: 4.5 GMACs at 224 (its paper and timm's table); NAT's cost grows at least with the pixel count
    swin = timm.create_model('swin_tiny_patch4_window7_224', device='meta').eval()
    assert benchmark.gmacs(swin, (224, 224)) == pytest.approx(4.5, rel=0.01)
    nat = timm.create_model('visionattn_nat_mini', device='meta').eval()
    assert benchmark.gmacs(nat, (448, 448)) >= 4 * benchmark.gmacs(nat, (224, 224))


def test_contenders_are_built_for_the_benchmark_size():
    swin = benchmark.create_at('swin_tiny_patch4_window7_224', 384)  # fixed size at build time
    assert tuple(swin.patch_embed.img_size) == (384, 384)
    nat = benchmark.create_at('visionattn_nat_mini', 384)  # any size, no img_size argument
    assert nat.pretrained_cfg['input_size'] == (3, 224, 224)
