"""lesiongen: mine a skin-lesion classifier's mistakes and answer them with Stable Diffusion."""

__version__ = "0.1.0"
