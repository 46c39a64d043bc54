"""Export: torch → ONNX with activation outputs; ONNX surgery; metadata inside the file."""
from .metadata import ModelMetadata, imagenet_labels, load_labels
from .onnx_surgery import expose_activation
from .torch_export import export_torch, find_activation_layer
from .zoo import ZOO, export_zoo_model

__all__ = ["ModelMetadata", "ZOO", "expose_activation", "export_torch", "export_zoo_model", "find_activation_layer",
           "imagenet_labels", "load_labels"]
