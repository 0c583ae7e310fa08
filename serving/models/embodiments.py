"""The embodiments the default model serves, with normalisation statistics and safety limits.

The numbers are plausible hand-written values, not fitted to a dataset: they give
each robot's state and actions a sensible scale so the (untrained) default model
produces actions of the right magnitude, and the limits are what the server
enforces on every action it returns, whatever the model says.

Action conventions (``description`` says the same to robot engineers):

* franka_arm: per-step joint-position deltas (rad) for 7 joints, then an absolute
  gripper command in [0, 1] (0 = closed, 1 = open).
* aloha_dual_arm: absolute joint-position targets (rad) for two 6-DoF arms, each
  followed by a gripper command in [0, 1]: [left 6, left gripper, right 6, right gripper].
* unitree_go2: absolute joint-position targets (rad) for 12 joints, legs in the
  order FR, FL, RR, RL, each (hip, thigh, calf).
"""

from __future__ import annotations

from serving.policy.base import CameraSpec, EmbodimentSpec

#: What robots should send; other frame sizes are resized on the server.
CAMERA_HEIGHT = 224
CAMERA_WIDTH = 224


def _cameras(*names: str) -> tuple[CameraSpec, ...]:
    return tuple(CameraSpec(name, CAMERA_HEIGHT, CAMERA_WIDTH) for name in names)


def _franka_arm() -> EmbodimentSpec:
    home = (0.0, -0.785, 0.0, -2.356, 0.0, 1.571, 0.785)  # the usual "ready" pose
    max_delta = (0.10, 0.10, 0.10, 0.10, 0.15, 0.15, 0.15)  # rad per 50 ms step (2-3 rad/s)
    return EmbodimentSpec(
        name="franka_arm",
        description="Franka 7-DoF arm with parallel gripper. State: 7 joint positions (rad) and "
        "gripper opening in [0, 1]. Actions: 7 joint-position deltas (rad per step) and a gripper "
        "command in [0, 1].",
        state_dim=8,
        action_dim=8,
        cameras=_cameras("front", "wrist"),
        chunk_length=16,
        control_rate_hz=20.0,
        state_mean=(*home, 0.5),
        state_std=(0.45, 0.40, 0.45, 0.45, 0.50, 0.40, 0.55, 0.40),
        action_mean=(0.0,) * 7 + (0.5,),
        action_std=(0.02, 0.02, 0.02, 0.025, 0.03, 0.03, 0.035, 0.45),
        action_low=tuple(-d for d in max_delta) + (0.0,),
        action_high=(*max_delta, 1.0),
    )


def _aloha_dual_arm() -> EmbodimentSpec:
    # One ViperX-300 arm: waist, shoulder, elbow, forearm roll, wrist angle, wrist rotate.
    arm_rest = (0.0, -0.96, 1.16, 0.0, -0.30, 0.0)
    arm_std = (0.30, 0.28, 0.30, 0.35, 0.30, 0.40)
    arm_low = (-3.14, -1.85, -1.76, -3.14, -1.87, -3.14)
    arm_high = (3.14, 1.26, 1.61, 3.14, 2.23, 3.14)
    return EmbodimentSpec(
        name="aloha_dual_arm",
        description="ALOHA bimanual rig: two 6-DoF arms with grippers. State and actions: "
        "[left 6 joints (rad), left gripper in [0, 1], right 6 joints, right gripper]; actions are "
        "absolute joint targets.",
        state_dim=14,
        action_dim=14,
        cameras=_cameras("front", "left_wrist", "right_wrist"),
        chunk_length=25,
        control_rate_hz=50.0,
        state_mean=(*arm_rest, 0.5) * 2,
        state_std=(*arm_std, 0.35) * 2,
        action_mean=(*arm_rest, 0.5) * 2,
        action_std=(*arm_std, 0.40) * 2,
        action_low=(*arm_low, 0.0) * 2,
        action_high=(*arm_high, 1.0) * 2,
    )


def _unitree_go2() -> EmbodimentSpec:
    # Per leg (hip, thigh, calf), legs FR, FL, RR, RL; standing pose and Go2 joint ranges.
    stand = (0.0, 0.8, -1.5) * 4
    joint_std = (0.10, 0.20, 0.25) * 4
    front_low, front_high = (-1.05, -1.57, -2.72), (1.05, 3.49, -0.84)
    rear_low, rear_high = (-1.05, -0.52, -2.72), (1.05, 4.53, -0.84)
    # Base: angular velocity (rad/s, body frame) and gravity direction in the body frame.
    base_mean = (0.0, 0.0, 0.0, 0.0, 0.0, -1.0)
    base_std = (0.5, 0.5, 0.5, 0.1, 0.1, 0.05)
    return EmbodimentSpec(
        name="unitree_go2",
        description="Unitree Go2 quadruped. State: 12 joint positions (rad; legs FR, FL, RR, RL, each "
        "hip/thigh/calf), base angular velocity (3, rad/s) and projected gravity (3). Actions: 12 "
        "absolute joint-position targets (rad).",
        state_dim=18,
        action_dim=12,
        cameras=_cameras("head"),
        chunk_length=8,
        control_rate_hz=50.0,
        state_mean=stand + base_mean,
        state_std=joint_std + base_std,
        action_mean=stand,
        action_std=joint_std,
        action_low=front_low * 2 + rear_low * 2,
        action_high=front_high * 2 + rear_high * 2,
    )


def default_embodiments() -> tuple[EmbodimentSpec, ...]:
    """The default embodiments, in a fixed order: the position is the model's embodiment id."""
    return (_franka_arm(), _aloha_dual_arm(), _unitree_go2())


def check_embodiment(spec: EmbodimentSpec) -> None:
    """Raise ValueError if ``spec``'s statistics or limits are inconsistent (lengths, std > 0, low <= high)."""
    lengths = {
        "state_mean": spec.state_dim,
        "state_std": spec.state_dim,
        "action_mean": spec.action_dim,
        "action_std": spec.action_dim,
        "action_low": spec.action_dim,
        "action_high": spec.action_dim,
    }
    for attr, expected in lengths.items():
        got = len(getattr(spec, attr))
        if got != expected:
            raise ValueError(f"embodiment {spec.name!r}: {attr} has {got} values, expected {expected}")
    if min(spec.state_std) <= 0 or min(spec.action_std) <= 0:
        raise ValueError(f"embodiment {spec.name!r}: standard deviations must be > 0")
    if any(lo > hi for lo, hi in zip(spec.action_low, spec.action_high, strict=True)):
        raise ValueError(f"embodiment {spec.name!r}: action_low must be <= action_high")
    if not spec.cameras:
        raise ValueError(f"embodiment {spec.name!r}: needs at least one camera")
    if spec.chunk_length < 1 or spec.state_dim < 1 or spec.action_dim < 1:
        raise ValueError(f"embodiment {spec.name!r}: dimensions and chunk_length must be >= 1")


def check_fits(
    spec: EmbodimentSpec, *, max_cameras: int, max_state_dim: int, max_action_dim: int, horizon: int
) -> None:
    """Raise ValueError if ``spec`` does not fit a model with these maximum sizes."""
    sizes = [
        ("cameras", len(spec.cameras), max_cameras),
        ("state_dim", spec.state_dim, max_state_dim),
        ("action_dim", spec.action_dim, max_action_dim),
        ("chunk_length", spec.chunk_length, horizon),
    ]
    for what, got, limit in sizes:
        if got > limit:
            raise ValueError(f"embodiment {spec.name!r}: {what} {got} exceeds the model's {limit}")
