"""runtime.layout: how a target layer holds its maps (NCHW, NHWC, NLC tokens), in pure numpy.

The reshape is pytorch-grad-cam's ``reshape_transform`` (drop the auxiliary tokens, grid row-major, channels
first); its inverse puts maps back into the layer's layout (ReciproCAM's masked copies). Bundles without
layout keys (every bundle before layouts) read as NCHW.
"""

from __future__ import annotations

import numpy as np
import pytest

from runtime.contract import BundleError, BundleMeta, Preprocessing
from runtime.layout import Layout, LayoutError, grid_family, split_tokens


def test_nchw_is_returned_as_it_is():
    a = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    assert Layout().to_maps(a) is a or np.shares_memory(Layout().to_maps(a), a)
    assert Layout().to_props() == {}


def test_nhwc_and_tokens_to_maps_and_back():
    rng = np.random.default_rng(0)
    maps = rng.standard_normal((5, 3, 4)).astype(np.float32)  # K=5 over a 3x4 grid
    nhwc = maps.transpose(1, 2, 0)
    lay = Layout("NHWC", (3, 4))
    np.testing.assert_array_equal(lay.to_maps(nhwc), maps)
    np.testing.assert_array_equal(lay.from_maps(maps[None])[0], nhwc)
    cls, dist = rng.standard_normal((2, 5)).astype(np.float32)
    cells = maps.reshape(5, 12).T  # [h*w, K], row-major cells
    first = np.concatenate([cls[None], dist[None], cells])  # [T=14, K]: CLS, distillation, grid
    last = np.concatenate([cells, cls[None], dist[None]])
    for tokens, where in ((first, "first"), (last, "last")):
        lay = Layout("NLC", (3, 4), 2, where)
        assert lay.tokens == 14 and lay.channel_axis == 2
        np.testing.assert_array_equal(lay.to_maps(tokens), maps)
        np.testing.assert_array_equal(lay.aux_of(tokens), np.stack([cls, dist]))
        back = lay.from_maps(maps[None], lay.aux_of(tokens))
        np.testing.assert_array_equal(back[0], tokens)
        assert lay.to_maps(tokens).flags.c_contiguous


def test_the_reshape_is_pytorch_grad_cams():
    torch = pytest.importorskip("torch")
    t = torch.randn(1, 50, 8)

    def reshape_transform(tensor, height=7, width=7):  # pytorch-grad-cam's tutorial, verbatim in effect
        result = tensor[:, 1:, :].reshape(tensor.size(0), height, width, tensor.size(2))
        return result.transpose(2, 3).transpose(1, 2)

    np.testing.assert_array_equal(Layout("NLC", (7, 7), 1).to_maps(t[0].numpy()), reshape_transform(t)[0].numpy())


def test_shapes_that_do_not_fit_are_refused_in_one_line():
    with pytest.raises(LayoutError, match="T != aux"):
        Layout("NLC", (7, 7), 1).maps_shape((1, 51, 8))
    with pytest.raises(LayoutError, match="4-D"):
        Layout("NHWC", (3, 3)).maps_shape((1, 9, 8))
    with pytest.raises(LayoutError, match="grid"):
        Layout("NHWC", (3, 3)).maps_shape((1, 4, 4, 8))
    for bad in (dict(kind="NLC"), dict(kind="NCL"), dict(kind="NHWC", aux_tokens=1), dict(kind="NLC", grid=(0, 3)),
                dict(kind="NLC", grid=(3, 3), aux_tokens=-1), dict(kind="NLC", grid=(3, 3), aux_position="middle")):
        with pytest.raises(LayoutError):
            Layout(**bad)


def test_metadata_round_trip_and_old_bundles():
    pre = Preprocessing((112, 112))
    for layout in (Layout(), Layout("NHWC", (7, 7)), Layout("NLC", (14, 14), 1), Layout("NLC", (7, 10), 5, "last")):
        meta = BundleMeta("classifier", "blocks.11.norm1", pre, layout=layout)
        assert BundleMeta.from_props(meta.to_props()).layout == layout
        assert meta.with_role("features", "x").layout == layout
    old = BundleMeta("classifier", "layer4", pre).to_props()  # what every bundle before layouts carries
    assert not any("layout" in k or "grid" in k for k in old)
    assert BundleMeta.from_props(old).layout == Layout()
    props = BundleMeta("classifier", "x", pre, layout=Layout("NLC", (14, 14), 1)).to_props()
    for key, value in (("scorecam.channel_axis", "1"), ("scorecam.grid", "[14]"), ("scorecam.aux_tokens", "x"),
                       ("scorecam.layout", "NCL")):
        with pytest.raises(BundleError) as e:
            BundleMeta.from_props({**props, key: value})
        assert "\n" not in str(e.value)


def test_token_splits():
    family = grid_family([(112, 112), (56, 56), (14, 14)], (224, 224))
    assert {(7, 7), (4, 4), (3, 3)} <= family and (16, 16) not in family
    assert split_tokens(197, [(14, 14)], family, (224, 224)) == ((14, 14), 1)
    assert split_tokens(198, [(14, 14)], family, (224, 224)) == ((14, 14), 2)
    assert split_tokens(201, [(14, 14)], family, (224, 224)) == ((14, 14), 5)  # CLS + 4 registers
    assert split_tokens(49, [], family, (224, 224)) == ((7, 7), 0)  # no patch embedding: the aspect ratio
    wide = grid_family([(14, 20)], (224, 320))
    assert split_tokens(281, [], wide, (224, 320)) == ((14, 20), 1)
    assert split_tokens(197, [(14, 14)], family, (224, 224), grid=(14, 14), aux=2) is None
    assert split_tokens(50, [(14, 14)], family, (224, 224), fallback=False) is None
