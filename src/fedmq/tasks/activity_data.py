"""A synthetic human-activity data set: 6 activities, a waist-worn 6-axis IMU, per subject.

No download: every window is computed from a seed. The shapes follow the UCI HAR
recordings (Anguita et al., 2013): a 3-axis accelerometer (in g) and a 3-axis gyroscope (in
rad/s) sampled at 50 Hz, cut into windows of 2.56 s (128 samples), ``x`` of shape
``(n, 128, 6)`` with channels ``acc_x, acc_y, acc_z, gyro_x, gyro_y, gyro_z``, ``y`` the
activity id (``ACTIVITIES``).

How a window is made (in the body frame: x up, y left, z forward, then turned into the
sensor's frame by the subject's placement of the sensor):

- gravity: 1 g along the body's up axis; sitting leans back 25-45 degrees, lying turns it
  onto the forward axis; the three walking activities lean forward a little;
- walking, upstairs, downstairs: a periodic gait at the subject's step frequency (1.6-2.1 Hz;
  upstairs 0.8x, downstairs 1.15x), vertical bounce with its second and third harmonics
  (downstairs lands hard: strong harmonics), forward surge, lateral sway and trunk rotation
  at half the step frequency (one stride is two steps), amplitudes scaled per subject;
- sitting, standing, lying: gravity with slow postural sway (standing sways most);
- every window: its own phase, a +-5 % change of tempo and +-10 % of amplitude, sensor noise
  (per subject 0.01-0.04 g, gyro 0.01-0.03 rad/s) and a small constant gyro bias.

Per subject (the reason nodes = subjects is non-IID): step frequency, gait amplitude
(log-normal, sd 0.25), how the sensor sits (tilted up to ~15 degrees off vertical and turned
by any angle about it), noise level and gyro bias. Subject ``k`` of seed ``s`` is drawn from
``numpy.random.default_rng([s, k])``, so it is the same whichever subjects are asked for.
"""

from collections.abc import Sequence

import numpy as np

ACTIVITIES = ("walking", "upstairs", "downstairs", "sitting", "standing", "lying")
RATE_HZ = 50
WINDOW = 128  # samples: 2.56 s
CHANNELS = 6  # acc x, y, z (g), gyro x, y, z (rad/s)
_TEMPO = {"walking": 1.0, "upstairs": 0.8, "downstairs": 1.15}
# vertical bounce (g) of the first three step harmonics
_BOUNCE = {
    "walking": (0.25, 0.08, 0.03),
    "upstairs": (0.3, 0.06, 0.02),
    "downstairs": (0.35, 0.2, 0.12),
}
_LEAN = {"walking": 0.05, "upstairs": 0.15, "downstairs": -0.05}  # radians forward


def subject_windows(
    subject: int, windows_per_activity: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of one subject: ``windows_per_activity`` windows of each activity, in order."""
    rng = np.random.default_rng([seed, subject])
    step_hz = rng.uniform(1.6, 2.1)
    amplitude = rng.lognormal(0.0, 0.25)
    placement = _turn_about_up(rng.uniform(0, 2 * np.pi)) @ _tilt(rng.normal(0, 0.15, 2))
    acc_noise, gyro_noise = rng.uniform(0.01, 0.04), rng.uniform(0.01, 0.03)
    gyro_bias = rng.normal(0, 0.01, 3)
    t = np.arange(WINDOW) / RATE_HZ
    xs, ys = [], []
    for label, activity in enumerate(ACTIVITIES):
        for _ in range(windows_per_activity):
            acc, gyro = _body_signals(activity, t, step_hz, amplitude, rng)
            acc = acc @ placement.T + rng.normal(0, acc_noise, acc.shape)
            gyro = gyro @ placement.T + gyro_bias + rng.normal(0, gyro_noise, gyro.shape)
            xs.append(np.concatenate([acc, gyro], axis=1))
            ys.append(label)
    return np.asarray(xs, dtype=np.float32), np.asarray(ys, dtype=np.int32)


def activity_data(
    subjects: Sequence[int], windows_per_activity: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of several subjects, subject after subject in the order given."""
    parts = [subject_windows(s, windows_per_activity, seed) for s in subjects]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _body_signals(
    activity: str, t: np.ndarray, step_hz: float, amplitude: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Accelerometer (g) and gyroscope (rad/s), shape (len(t), 3) each, in the body frame."""
    window_amplitude = amplitude * rng.uniform(0.9, 1.1)
    acc = np.zeros((len(t), 3))
    gyro = np.zeros((len(t), 3))
    if activity in _TEMPO:
        f = step_hz * _TEMPO[activity] * rng.uniform(0.95, 1.05)
        phase = rng.uniform(0, 2 * np.pi)
        step = 2 * np.pi * f * t + phase
        bounce = sum(a * np.sin((h + 1) * step) for h, a in enumerate(_BOUNCE[activity]))
        acc[:, 0] = window_amplitude * bounce
        acc[:, 2] = window_amplitude * 0.15 * np.sin(step + np.pi / 2)  # forward surge
        acc[:, 1] = window_amplitude * 0.1 * np.sin(step / 2)  # lateral sway, per stride
        gyro[:, 0] = window_amplitude * 0.6 * np.sin(step / 2 + 0.3)  # trunk yaw
        gyro[:, 1] = window_amplitude * 0.3 * np.sin(step + 1.0)  # pitch with each step
        gyro[:, 2] = window_amplitude * 0.25 * np.sin(step / 2 + 1.7)  # roll
        up = _tilt(np.array([_LEAN[activity], 0.0]))[:, 0]
    else:
        sway = {"standing": 0.03, "sitting": 0.01, "lying": 0.005}[activity]
        slow = rng.uniform(0.1, 0.4, 3)
        offsets = rng.uniform(0, 2 * np.pi, 3)
        for axis in range(3):
            acc[:, axis] = sway * np.sin(2 * np.pi * slow[axis] * t + offsets[axis])
            gyro[:, axis] = 2 * sway * np.cos(2 * np.pi * slow[axis] * t + offsets[axis])
        lean = {"standing": 0.0, "sitting": -rng.uniform(0.45, 0.8), "lying": -np.pi / 2}
        up = _tilt(np.array([lean[activity] + rng.normal(0, 0.05), rng.normal(0, 0.05)]))[:, 0]
    return acc + up, gyro


def _tilt(angles: np.ndarray) -> np.ndarray:
    """Rotation turning the up axis (x) forward (about y) then left (about z)."""
    pitch, roll = angles
    about_y = np.array(
        [[np.cos(pitch), 0, -np.sin(pitch)], [0, 1, 0], [np.sin(pitch), 0, np.cos(pitch)]]
    )
    about_z = _rotation_x_to_y(roll)
    return about_z @ about_y


def _rotation_x_to_y(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def _turn_about_up(angle: float) -> np.ndarray:
    """Rotation about the up axis (x): how the sensor is turned on the waist."""
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
