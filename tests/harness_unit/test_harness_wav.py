"""Tone detection on generated WAVs: the check that a call carried the peer's audio."""

from __future__ import annotations

import array
import wave
from pathlib import Path

import pytest

from harness.wav import analyse_wav, assert_tone, make_tone_wav, tone_ratio, wav_tone


@pytest.mark.parametrize(("hz", "rate", "channels"), [
    (440, 8000, 1), (880, 8000, 1), (660, 8000, 1), (990, 16000, 1), (440, 48000, 2),
    (3000, 8000, 1),
])
def test_pure_tones(tmp_path: Path, hz: float, rate: int, channels: int) -> None:
    path = make_tone_wav(tmp_path / "t.wav", hz, 2.0, rate=rate, channels=channels)
    result = analyse_wav(path)
    assert abs(result.freq_hz - hz) < 0.005 * hz, result
    assert (result.rate, result.channels) == (rate, channels)
    assert result.total_s == pytest.approx(2.0)
    assert result.active_s == pytest.approx(2.0, abs=0.02)
    assert result.rms == pytest.approx(12000 / 2 ** 0.5, rel=0.01)
    assert wav_tone(path) == result.freq_hz
    assert tone_ratio(path, hz) > 0.95
    assert tone_ratio(path, hz * 1.5) < 0.01


def test_silence(tmp_path: Path) -> None:
    path = make_tone_wav(tmp_path / "s.wav", 440, 1.0, amplitude=0)
    result = analyse_wav(path)
    assert (result.active_s, result.freq_hz, result.rms) == (0.0, 0.0, 0.0)
    assert tone_ratio(path, 440) == 0.0
    with pytest.raises(AssertionError, match="expected a 440 Hz tone"):
        assert_tone(path, 440)


def test_quiet_tone_counts_as_silence(tmp_path: Path) -> None:
    assert analyse_wav(make_tone_wav(tmp_path / "q.wav", 440, 1.0, amplitude=200)).active_s == 0


def _concat(dest: Path, *parts: Path) -> Path:
    frames = b""
    for part in parts:
        with wave.open(str(part), "rb") as w:
            frames += w.readframes(w.getnframes())
    with wave.open(str(dest), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(frames)
    return dest


def test_tone_with_silence_around_it(tmp_path: Path) -> None:
    # what a call dump looks like: silence while the call sets up, then the peer's tone
    silence = make_tone_wav(tmp_path / "s.wav", 1, 0.5, amplitude=0)
    tone = make_tone_wav(tmp_path / "t.wav", 880, 1.5)
    result = assert_tone(_concat(tmp_path / "c.wav", silence, tone, silence), 880)
    assert result.active_s == pytest.approx(1.5, abs=0.04)
    assert result.total_s == pytest.approx(2.5)


def test_wrong_tone_and_too_short(tmp_path: Path) -> None:
    path = make_tone_wav(tmp_path / "t.wav", 440, 2.0)
    with pytest.raises(AssertionError, match="880 Hz"):
        assert_tone(path, 880)
    assert_tone(path, 450, tolerance=0.05)
    short = make_tone_wav(tmp_path / "short.wav", 440, 0.5)
    with pytest.raises(AssertionError):
        assert_tone(short, 440)
    assert_tone(short, 440, min_active_s=0.4)


def test_tone_ratio_finds_a_tone_in_a_mix(tmp_path: Path) -> None:
    # two tones at once (a bridge that adds the caller's own audio to the callee's)
    a = make_tone_wav(tmp_path / "a.wav", 440, 1.0, amplitude=6000)
    b = make_tone_wav(tmp_path / "b.wav", 880, 1.0, amplitude=6000)
    samples = []
    for part in (a, b):
        with wave.open(str(part), "rb") as w:
            samples.append(array.array("h", w.readframes(w.getnframes())))
    mixed = tmp_path / "m.wav"
    with wave.open(str(mixed), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(array.array("h", map(sum, zip(*samples, strict=True))).tobytes())
    assert tone_ratio(mixed, 440) == pytest.approx(0.5, abs=0.02)
    assert tone_ratio(mixed, 880) == pytest.approx(0.5, abs=0.02)
    assert tone_ratio(mixed, 660) < 0.01


def test_rejects_8_bit(tmp_path: Path) -> None:
    path = tmp_path / "u8.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(1)
        w.setframerate(8000)
        w.writeframes(b"\x80" * 800)
    with pytest.raises(ValueError, match="16-bit"):
        analyse_wav(path)
