"""Cascading model-parameter randomisation on a tiny torch CNN."""
import numpy as np
import pytest

from metric_models import TinyCNN
from explainrt import InvalidInputError
from explainrt.metrics.sanity import cascading_randomization, parameter_layers


def test_parameter_layers_top_down():
    assert parameter_layers(TinyCNN()) == ["fc", "conv2", "conv1"]


def test_cascading_randomization(tmp_path):
    model = TinyCNN(seed=1)
    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = cascading_randomization(model, image, ["fem", "scorecam"], seed=0, workdir=str(tmp_path),
                                     input_size=(16, 16))
    assert result.steps == ["original", "fc", "conv2", "conv1"]
    for method in ("fem", "scorecam"):
        assert result.maps[method].shape == (4, 16, 16)
        assert result.correlations[method][0] == pytest.approx(1.0)
        assert result.correlations[method][-1] < 0.8, result.correlations
    # FEM is class-agnostic: randomising only the classifier leaves its map exactly as it was.
    assert result.correlations["fem"][1] == pytest.approx(1.0)
    np.testing.assert_array_equal(result.maps["fem"][0], result.maps["fem"][1])
    # The caller's model is untouched.
    for k, v in model.state_dict().items():
        assert np.array_equal(v.numpy(), before[k].numpy())
    assert set(result.to_dict()["spearman"]) == {"fem", "scorecam"}


def test_unknown_layer():
    with pytest.raises(InvalidInputError, match="no module"):
        cascading_randomization(TinyCNN(), np.zeros((16, 16, 3), np.uint8), ["fem"], layers=["nope"],
                                input_size=(16, 16))
