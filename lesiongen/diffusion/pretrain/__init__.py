"""In-house base pretraining (`lesiongen base pretrain`)."""

from lesiongen.diffusion.pretrain.config import PretrainConfig, UnetStageConfig, VaeStageConfig
from lesiongen.diffusion.pretrain.run import pretrain_base
from lesiongen.diffusion.pretrain.trainer import PretrainResult

__all__ = ["PretrainConfig", "PretrainResult", "UnetStageConfig", "VaeStageConfig", "pretrain_base"]
