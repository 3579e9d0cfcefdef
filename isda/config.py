"""ISDA's configuration keys (``add_isda_config``)."""
from detectron2.config import CfgNode as CN


def add_isda_config(cfg):
    """Add ISDA's keys (``MODEL.ISDA.*`` and the solver extras) to a Detectron2 config."""
    cfg.MODEL.ISDA = CN()
    cfg.MODEL.ISDA.NUM_QUERIES = 300
