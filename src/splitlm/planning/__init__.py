"""The cut planner (``splitlm plan``; survey §4.1 split-point selection, §4.6 joint optimisation).

``profile`` measures what each block of the real model costs on the client's and the server's device,
``predict`` turns that into every cut's step time (a simulation of the client's schedule over the links and the
server), memory and traffic, and ``table`` picks the fastest cut within each client's memory budget and prints it.
"""

from splitlm.planning.predict import ClientSetting, LinkModel, Prediction, best, candidates, predict, predict_all
from splitlm.planning.profile import EndProfile, PartProfile, Profile, profile_model
from splitlm.planning.table import Plan, as_json, make_plan, render

__all__ = [
    "ClientSetting",
    "EndProfile",
    "LinkModel",
    "PartProfile",
    "Plan",
    "Prediction",
    "Profile",
    "as_json",
    "best",
    "candidates",
    "make_plan",
    "predict",
    "predict_all",
    "profile_model",
    "render",
]
