"""The built-in posterior problem (deblurring layered images) and the ``invnet demo`` job."""
from .job import DEMO_SIZES, run_demo
from .problem import NOISE, blur, layered_images, make_demo_data

__all__ = ["run_demo", "DEMO_SIZES", "layered_images", "blur", "make_demo_data", "NOISE"]
