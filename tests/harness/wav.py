"""Tone WAVs: make them, and tell which tone a decoded call recording holds (stdlib only).

Each softphone in a test sends its own sine tone; the receiver's decoded-audio dump must hold the
*peer's* tone. That proves media flowed end to end, in the right direction, and was decoded, which
packet counters alone do not (a bridge could loop a caller's audio back to itself).
"""

from __future__ import annotations

import array
import itertools
import math
import sys
import wave
from dataclasses import dataclass
from pathlib import Path

ACTIVE_RMS = 300.0  # 16-bit sample RMS above which a 20 ms block counts as sound, not silence


@dataclass(frozen=True, slots=True)
class ToneAnalysis:
    """What a WAV holds: duration, how much of it is sound, and the sound's frequency."""

    path: Path
    rate: int
    channels: int
    total_s: float
    active_s: float
    rms: float
    freq_hz: float  # zero-crossing estimate over the active blocks; 0.0 when all silent

    def matches(self, hz: float, *, tolerance: float = 0.05, min_active_s: float = 1.0) -> bool:
        return self.active_s >= min_active_s and abs(self.freq_hz - hz) <= tolerance * hz

    def __str__(self) -> str:
        return (f"{self.path.name}: {self.rate} Hz x{self.channels}, {self.total_s:.2f} s total, "
                f"{self.active_s:.2f} s active, rms={self.rms:.0f}, "
                f"zero-crossing freq={self.freq_hz:.1f} Hz")


def _read_channel0(path: Path) -> tuple[array.array[int], int, int, float]:
    with wave.open(str(path), "rb") as w:
        channels, width, rate, frames = (w.getnchannels(), w.getsampwidth(), w.getframerate(),
                                         w.getnframes())
        if width != 2:
            raise ValueError(f"{path}: expected 16-bit PCM, got {8 * width}-bit")
        raw = w.readframes(frames)
    samples = array.array("h")
    samples.frombytes(raw[: len(raw) - len(raw) % 2])
    if sys.byteorder == "big":
        samples.byteswap()  # WAV is little-endian
    if channels > 1:
        samples = samples[::channels]
    return samples, rate, channels, frames / rate if rate else 0.0


def analyse_wav(path: str | Path, *, active_rms: float = ACTIVE_RMS) -> ToneAnalysis:
    """Port of the shared harness's wavcheck.py: 20 ms blocks, keep those louder than
    ``active_rms``, count zero crossings inside runs of consecutive active blocks."""
    path = Path(path)
    x, rate, channels, total_s = _read_channel0(path)
    block = max(1, rate // 50)
    active = crossings = 0
    energy = 0.0
    prev_active = False
    prev_sample = 0
    for start in range(0, len(x) - block + 1, block):
        chunk = x[start : start + block]
        e = sum(v * v for v in chunk) / block
        is_active = math.sqrt(e) > active_rms
        if is_active:
            active += block
            energy += e * block
            if prev_active and (prev_sample < 0) != (chunk[0] < 0):
                crossings += 1  # crossing across the block boundary
            crossings += sum(1 for a, b in itertools.pairwise(chunk)
                             if (a < 0) != (b < 0))
        prev_active, prev_sample = is_active, chunk[-1]
    active_s = active / rate if rate else 0.0
    return ToneAnalysis(
        path=path, rate=rate, channels=channels, total_s=total_s, active_s=active_s,
        rms=math.sqrt(energy / active) if active else 0.0,
        freq_hz=crossings / 2 / active_s if active else 0.0,
    )


def wav_tone(path: str | Path) -> float:
    """Dominant frequency of a (single-tone) WAV in Hz; 0.0 if it holds only silence."""
    return analyse_wav(path).freq_hz


def tone_ratio(path: str | Path, hz: float) -> float:
    """Share (0..1) of the signal's energy at ``hz`` (Goertzel over the whole file).

    Zero crossings only name the strongest tone; this tells whether a given tone is present when
    others are mixed in (e.g. a bridge that adds the caller's own audio). It is a coherent
    measure: a tone sounding through a fraction f of the file scores about f squared.
    """
    x, rate, _, _ = _read_channel0(Path(path))
    if not x or not rate:
        return 0.0
    w = 2 * math.pi * hz / rate
    coeff = 2 * math.cos(w)
    s1 = s2 = 0.0
    total = 0.0
    for v in x:
        s0 = v + coeff * s1 - s2
        s2, s1 = s1, s0
        total += v * v
    power = s1 * s1 + s2 * s2 - coeff * s1 * s2  # |X(hz)|^2
    # a pure tone of amplitude A over N samples: |X|^2 = (A*N/2)^2 and total = A^2*N/2
    return min(1.0, 2 * power / (len(x) * total)) if total else 0.0


def assert_tone(
    path: str | Path, hz: float, *, tolerance: float = 0.05, min_active_s: float = 1.0
) -> ToneAnalysis:
    """Fail with the full analysis unless ``path`` holds ``hz`` for at least ``min_active_s``."""
    result = analyse_wav(path)
    if not result.matches(hz, tolerance=tolerance, min_active_s=min_active_s):
        raise AssertionError(f"expected a {hz:g} Hz tone for >= {min_active_s:g} s: {result}")
    return result


def make_tone_wav(
    path: str | Path,
    hz: float,
    seconds: float,
    *,
    rate: int = 8000,
    channels: int = 1,
    amplitude: int = 12000,
) -> Path:
    """Write a 16-bit sine WAV (what linphonec plays with ``soundcard use files``)."""
    path = Path(path)
    frames = array.array("h")
    for i in range(int(rate * seconds)):
        v = int(amplitude * math.sin(2 * math.pi * hz * i / rate))
        frames.extend([v] * channels)
    if sys.byteorder == "big":
        frames.byteswap()
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(frames.tobytes())
    return path
