"""Runtime interventions: pure operations on activations, attached as hooks that always clean up."""

from featsteer.interventions.condition import Gate, best_threshold, fit_gate, gate_hooks, prompt_means
from featsteer.interventions.erasure import Erase, LeaceEraser, fit_leace, fit_leace_erasers
from featsteer.interventions.experts import ExpertRouting, ExpertScore, ExpertSteer, expert_routing
from featsteer.interventions.operations import ablate, add, as_basis, cosine_to, project_set, rotate_in_plane
from featsteer.interventions.positions import PositionTracker
from featsteer.interventions.steering import (
    LAYERS,
    NORMS,
    RESIDUAL,
    WRITES,
    Ablate,
    AddDirection,
    AffineEdit,
    AngularSteer,
    ConditionalSteer,
    HeadAblate,
    Intervention,
    ProjectionSet,
    resolve_sites,
    steer,
)

__all__ = [
    "LAYERS",
    "NORMS",
    "RESIDUAL",
    "WRITES",
    "Ablate",
    "AddDirection",
    "AffineEdit",
    "AngularSteer",
    "ConditionalSteer",
    "Erase",
    "ExpertRouting",
    "ExpertScore",
    "ExpertSteer",
    "Gate",
    "HeadAblate",
    "Intervention",
    "LeaceEraser",
    "PositionTracker",
    "ProjectionSet",
    "ablate",
    "add",
    "as_basis",
    "best_threshold",
    "cosine_to",
    "expert_routing",
    "fit_gate",
    "gate_hooks",
    "fit_leace",
    "fit_leace_erasers",
    "project_set",
    "prompt_means",
    "rotate_in_plane",
    "resolve_sites",
    "steer",
]
