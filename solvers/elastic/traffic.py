"""Bursty arrival traces for autoscaling: demand over time as a fraction of a peak.

Shapes (``horizon`` seconds, one value per ``interval`` seconds):

* ``step``: ``low`` for the first quarter, ``high`` until three quarters, then ``low`` again;
* ``spike``: ``low`` with two short bursts to ``high`` (each a twentieth of the horizon, rising
  and falling over a minute) at seeded times;
* ``diurnal``: a day compressed into the horizon, ``low`` at the ends and ``high`` in the middle
  (a raised cosine).

On top, bursty noise: a seeded log-normal AR(1) factor (correlation 0.8 per interval, standard
deviation ``noise``), so neighbouring intervals move together as real traffic does. Values are
fractions of the peak the deployment is sized for (1.0 = the peak); a simulation multiplies them
by a rate in tokens per second.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moeplan.errors import InputError

SHAPES = ("step", "spike", "diurnal")
AR_CORRELATION = 0.8
RAMP_SECONDS = 60.0


@dataclass(frozen=True)
class ArrivalTrace:
    """Demand per interval. ``times`` [T] interval starts (seconds), ``demand`` [T] fraction of
    the peak, ``interval`` seconds per value."""

    shape: str
    seed: int
    times: np.ndarray
    demand: np.ndarray
    interval: float

    @property
    def horizon(self) -> float:
        return float(self.times[-1] + self.interval)


def arrival_trace(shape: str, seed: int = 0, horizon: float = 7200.0, interval: float = 10.0, low: float = 0.25,
                  high: float = 0.95, noise: float = 0.08) -> ArrivalTrace:
    """A demand trace of ``shape`` (see the module docstring)."""
    if shape not in SHAPES:
        raise InputError(f"unknown traffic shape '{shape}'", field="shape", fix=f"use one of: {', '.join(SHAPES)}")
    if interval <= 0 or horizon < 4 * interval:
        raise InputError(f"need interval > 0 and a horizon of at least 4 intervals, got {horizon} s / {interval} s",
                         field="horizon")
    if not 0 <= low <= high or noise < 0:
        raise InputError(f"need 0 ≤ low ≤ high and noise ≥ 0, got low {low}, high {high}, noise {noise}",
                         field="traffic")
    rng = np.random.default_rng(seed)
    t = np.arange(0.0, horizon, interval)
    if shape == "step":
        base = np.where((t >= horizon / 4) & (t < 3 * horizon / 4), high, low)
    elif shape == "spike":
        base = np.full(t.shape, low)
        width = horizon / 20
        for start in np.sort(rng.uniform(0.1 * horizon, 0.85 * horizon, size=2)):
            rise = np.clip((t - start) / RAMP_SECONDS, 0, 1) * np.clip((start + width - t) / RAMP_SECONDS, 0, 1)
            base = np.maximum(base, low + (high - low) * rise)
    else:
        base = low + (high - low) * (1 - np.cos(2 * np.pi * t / horizon)) / 2
    factor = np.empty(t.shape)
    z = rng.standard_normal(t.shape)
    state = 0.0
    for i in range(t.size):
        state = AR_CORRELATION * state + np.sqrt(1 - AR_CORRELATION**2) * z[i]
        factor[i] = np.exp(noise * state - noise**2 / 2)
    return ArrivalTrace(shape, seed, t, np.maximum(base * factor, 0.0), float(interval))
