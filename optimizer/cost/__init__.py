"""The cost model and the device profiles it reads."""
from .model import Cost, CostModel, MatmulShape
from .profile import DeviceProfile, ProfileError, known_profiles, load_profile, save_profile

__all__ = ["Cost", "CostModel", "DeviceProfile", "MatmulShape", "ProfileError", "known_profiles", "load_profile",
           "save_profile"]
