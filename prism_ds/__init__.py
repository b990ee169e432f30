"""prism-ds: PRISM self-correcting masked diffusion models on DeepSpeed.

Public API (everything else is internal):
    load_config, RunConfig             typed configs from YAML recipes + dotted overrides
    mask_tokens, build_y               the masking process and PRISM y-construction
    mdm_loss, prism_loss               the two loss terms
    sample, SamplerSettings            the one sampler loop and its typed settings
    SamplingRecord                     what a sample() call did: its passes and, when asked, its steps
    EvenSchedule, BlockwiseSchedule    unmask schedules (Algorithms 2/3; LLaDA's semi-autoregressive blocks)
    POLICIES                           remask policies
    build_model, PrismModel            DiT backbone + quality head (PrismModel wraps any backbone)
    LLaDAConfig, LLaDAModelLM          LLaDA, checkpoint-compatible with GSAI-ML/LLaDA-8B-Instruct
    train, load_model                  DeepSpeed training stage; loading exports and pretrained folders
"""
from prism_ds.config import RunConfig, load_config
from prism_ds.core.loss import mdm_loss, prism_loss
from prism_ds.core.masking import mask_tokens
from prism_ds.core.remask import POLICIES
from prism_ds.core.sampler import SamplerSettings, SamplingRecord, sample
from prism_ds.core.schedules import BlockwiseSchedule, EvenSchedule
from prism_ds.core.y_construction import build_y
from prism_ds.engine.trainer import train
from prism_ds.models.llada import LLaDAConfig, LLaDAModelLM
from prism_ds.models.loading import load_model
from prism_ds.models.prism_model import PrismModel, build_model

__all__ = ["RunConfig", "load_config", "mask_tokens", "build_y", "mdm_loss", "prism_loss", "sample",
           "SamplerSettings", "SamplingRecord", "EvenSchedule", "BlockwiseSchedule", "POLICIES", "build_model",
           "PrismModel", "LLaDAConfig", "LLaDAModelLM", "train", "load_model"]
__version__ = "0.1.0"
