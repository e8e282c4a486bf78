from automl_tl_example_backbone import ExampleBackbone

from automl_tl.testing import check_backbone


def test_contract():
    check_backbone(ExampleBackbone())
