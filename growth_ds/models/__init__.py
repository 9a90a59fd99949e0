"""Reference decoder (GPT-2 and Llama flavours) and its parameter schema."""
from growth_ds.models.decoder import Decoder, build_model, init_weights, lm_loss
from growth_ds.models.schema import ParamSpec, param_shape, parameter_schema

__all__ = ["Decoder", "build_model", "init_weights", "lm_loss", "ParamSpec", "param_shape", "parameter_schema"]
