"""The evaluation suite: Fréchet distance against a SciPy reference, statistics files, clear errors, and a
1-process vs 2-process `eval compare` that must agree."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from conftest import run_cli
from PIL import Image

from diffroute.metrics import frechet
from diffroute.metrics.images import load_folder


class FlatFeatures(torch.nn.Module):
    """Features = the pixels of a 2x2 image (12 dims), so tests control the feature distribution exactly."""

    extractor_id = "test/flat"
    resize = "none"
    num_features = 12

    def forward(self, images):
        return images.flatten(1).double()


def _random_images(n, seed, scale=255):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, 2, 2, generator=g) * scale).round().to(torch.uint8)


def _scipy_fd(x, y):
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fd_of_a_set_with_itself_is_zero():
    imgs = _random_images(200, 0)
    assert abs(frechet.frechet_distance(imgs, imgs, FlatFeatures())["value"]) < 1e-6


def test_fd_matches_scipy_reference():
    a, b = _random_images(300, 1), _random_images(300, 2, scale=200)
    ours = frechet.frechet_distance(a, b, FlatFeatures())
    ref = _scipy_fd(a.flatten(1).double().numpy(), b.flatten(1).double().numpy())
    assert ours["value"] == pytest.approx(ref, rel=1e-6)
    assert ours["feature"] == "test/flat" and ours["n_a"] == ours["n_b"] == 300


def test_stats_round_trip(tmp_path):
    a, b = _random_images(100, 3), _random_images(100, 4)
    feat = FlatFeatures()
    sa = frechet.stats_of_images(a, feat)
    sa.save(tmp_path / "a.npz")
    back = frechet.FeatureStats.load(tmp_path / "a.npz")
    assert np.array_equal(back.mu, sa.mu) and np.array_equal(back.sigma, sa.sigma) and back.n == 100
    direct = frechet.frechet_distance(a, b, feat)["value"]
    assert frechet.fd_from_stats(back, frechet.stats_of_images(b, feat))["value"] == pytest.approx(direct, rel=1e-12)
    other = frechet.FeatureStats(sa.mu, sa.sigma, sa.n, "inception-v3-compat/2048", "x")
    with pytest.raises(ValueError, match="made differently"):
        frechet.fd_from_stats(sa, other)


def test_fewer_than_two_samples_refused_and_small_sets_warn():
    with pytest.raises(ValueError, match="at least 2"):
        frechet.stats_of_images(_random_images(1, 0), FlatFeatures())
    with pytest.warns(UserWarning, match="biased"):
        frechet.frechet_distance(_random_images(10, 0), _random_images(10, 1), FlatFeatures())


def _write(folder: Path, n: int, size=(8, 8)):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", size, (i * 20 % 255, 0, 0)).save(folder / f"{i:03d}.png")


def test_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is empty"):
        load_folder(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_folder(tmp_path / "nowhere")
    _write(tmp_path / "mixed", 2)
    Image.new("RGB", (16, 16)).save(tmp_path / "mixed" / "big.png")
    with pytest.raises(ValueError, match="mixed sizes"):
        load_folder(tmp_path / "mixed")
    _write(tmp_path / "broken", 2)
    (tmp_path / "broken" / "oops.png").write_text("not a png")
    with pytest.raises(ValueError, match="not a readable image"):
        load_folder(tmp_path / "broken")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="no images"):
        load_folder(tmp_path / "text")


def _cli(*args, launcher=None):
    """In this process (see conftest.run_cli), or under `launcher` (accelerate launch) as processes of their own."""
    if launcher is None:
        return run_cli(*args)
    return subprocess.run([*launcher, *args], capture_output=True, text=True, timeout=600)


def test_cli_errors_before_work(tmp_path):
    _write(tmp_path / "imgs", 3)
    (tmp_path / "p.txt").write_text("one\ntwo\n")
    proc = _cli("eval", "clip", str(tmp_path / "imgs"), "--prompts", str(tmp_path / "p.txt"))
    assert proc.returncode == 2 and "3 images but 2 prompts" in proc.stderr
    (tmp_path / "e").mkdir()
    proc = _cli("eval", "fid", str(tmp_path / "e"), str(tmp_path / "imgs"))
    assert proc.returncode == 2 and "is empty" in proc.stderr
    proc = _cli(
        "eval",
        "compare",
        "--model",
        "tiny-pixart",
        "--prompts",
        str(tmp_path / "p.txt"),
        "--n",
        "5",
        "--out",
        str(tmp_path / "c"),
    )
    assert proc.returncode == 2 and "more samples than the 2 prompts" in proc.stderr
    assert not (tmp_path / "c").exists()


def test_compare_one_and_two_processes_agree(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(["red apple", "grinning face", "flag: japan", "cat", "blue car", "tree"]) + "\n")
    common = [
        "eval",
        "compare",
        "--model",
        "tiny-pixart",
        "--prompts",
        str(prompts),
        "--n",
        "6",
        "--batch",
        "2",
        "--steps",
        "6",
        "--repeats",
        "1",
        "--plans",
        "fora-3",
        "--paired-with",
        "fora-3",
        "--features",
        "emoji-clip",
        "--json",
        # MKL/oneDNN pick kernels by thread count on some CPUs (runtime.set_threads): equal threads per process
        "--threads",
        "1",
    ]
    # a process of its own, like each launched one (threads and kernel choices as theirs)
    one = _cli(*common, "--out", str(tmp_path / "one"), launcher=(sys.executable, "-m", "diffroute"))
    assert one.returncode == 0, one.stderr
    launch = (
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "diffroute",
    )
    two = _cli(*common, "--out", str(tmp_path / "two"), launcher=launch)
    assert two.returncode == 0, two.stderr
    r1, r2 = json.loads(one.stdout), json.loads(two.stdout)
    assert (r1["processes"], r2["processes"]) == (1, 2)
    assert r1["threads_per_process"] == r2["threads_per_process"] == 1
    for i in range(6):  # the images themselves, not only their metrics
        for plan in ("full", "fora-3"):
            png = f"images/{plan}/{i:06d}.png"
            assert (tmp_path / "one" / png).read_bytes() == (tmp_path / "two" / png).read_bytes(), png
    for plan in ("full", "fora-3"):
        a, b = r1["plans"][plan], r2["plans"][plan]
        keys = ("computed_fraction", "psnr_vs_full_db", "psnr_mean_vs_full_db", "ssim_vs_full", "fd_vs_full")
        keys += ("kid_vs_full", "kid_vs_full_anchored", "psnr_vs_full_ci95", "psnr_mean_vs_full_ci95")
        keys += ("fd_vs_full_ci95",)  # per-image features gathered and put back in sample order
        keys += ("computed_flop_share", "flop_ideal_speedup")
        keys += ("psnr_mean_diff_db", "psnr_mean_diff_ci95")  # per-image MSEs put back in sample order
        for key in keys:
            assert (a[key] is None and b[key] is None) or a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-9), key
    full, fora = r1["plans"]["full"], r1["plans"]["fora-3"]
    # FLOPs: full computes all of them; FORA-3 (every third step computed, the rest reused) a share that is neither
    # its call count (the model outside the blocks runs at every step) nor more than it
    assert full["computed_flop_share"] == pytest.approx(1.0) and full["flop_ideal_speedup"] == pytest.approx(1.0)
    assert fora["computed_fraction"] < fora["computed_flop_share"] < 1
    assert fora["flop_ideal_speedup"] == pytest.approx(1 / fora["computed_flop_share"])
    assert fora["timed_flop_share"] == pytest.approx(fora["computed_flop_share"])  # a static plan: any prompts
    assert ("speedup_transformer_quartiles" in fora) == (r1["repeats"] >= 2)  # one repeat: no quartiles
    assert full["kid_vs_full_anchored"] == 0 and full["psnr_mean_vs_full_db"] == 60  # identical: capped
    assert fora["psnr_mean_diff_db"] == 0 and fora["psnr_mean_diff_ci95"] == [0, 0]  # paired with itself
    assert full["psnr_mean_diff_db"] == pytest.approx(60 - fora["psnr_mean_vs_full_db"])
    lo, hi = fora["psnr_mean_vs_full_ci95"]
    assert lo <= fora["psnr_mean_vs_full_db"] <= hi and lo < hi
    assert full["fd_vs_full_ci95"] == pytest.approx([0, 0], abs=1e-6) and 0 < fora["fd_vs_full_ci95"][1]
    for name in ("results.json", "results.csv", "results.md", "speed_quality.png", "grid.png"):
        assert (tmp_path / "two" / name).is_file()
    # resumable: a second run regenerates nothing (the PNGs keep their modification times)
    png = tmp_path / "one" / "images" / "fora-3" / "000000.png"
    before = png.stat().st_mtime_ns
    again = _cli(*common, "--out", str(tmp_path / "one"), "--repeats", "2", "--pairing", "neighbours")
    assert again.returncode == 0 and png.stat().st_mtime_ns == before
    timed = json.loads(again.stdout)  # re-timed with full run beside every plan: ratios paired by neighbours
    assert timed["pairing"] == "neighbours" and timed["plans"]["full"]["speedup_transformer"] == 1
    q1, q3 = timed["plans"]["fora-3"]["speedup_transformer_quartiles"]
    assert 0 < q1 <= timed["plans"]["fora-3"]["speedup_transformer"] <= q3  # the median of two ratios
    # images made at another thread count are not mixed in: the resume is refused before any work
    other = _cli(*common[:-1], "2", "--out", str(tmp_path / "one"))
    assert other.returncode != 0 and "threads_per_process" in other.stderr and png.stat().st_mtime_ns == before
    # nor images an older executor made (its arithmetic changed the values since): refused, naming the cause
    record = tmp_path / "one" / "images" / "fora-3" / "plan.json"
    older = json.loads(record.read_text())
    older["executor_numerics"] -= 1
    record.write_text(json.dumps(older))
    stale = _cli(*common, "--out", str(tmp_path / "one"))
    assert stale.returncode != 0 and "executor_numerics" in stale.stderr and png.stat().st_mtime_ns == before


def test_psnr_summary_pooled_and_capped_mean():
    import torch

    from diffroute.metrics.fidelity import psnr_summary

    mse = torch.tensor([1e-2, 1e-4, 0.0])  # 20 dB, 40 dB, identical
    s = psnr_summary(mse)
    assert s["psnr_vs_full_db"] == pytest.approx(-10 * np.log10((1e-2 + 1e-4) / 3))  # one MSE over the set
    assert s["psnr_mean_vs_full_db"] == pytest.approx((20 + 40 + 60) / 3)  # the identical image counts 60, not inf
    assert s["psnr_vs_full_ci95"][0] <= s["psnr_vs_full_db"] <= s["psnr_vs_full_ci95"][1]
    assert psnr_summary(torch.zeros(4))["psnr_vs_full_db"] is None
    assert psnr_summary(mse.flip(0)) == s  # order-free


def test_paired_psnr_difference_against_a_known_answer():
    """Every image of half the MSE of its pair: exactly +3.01 dB, a band of width 0, although the images' own
    PSNRs spread over 40 dB (unpaired bands of the two means overlap); a different image count is refused."""
    from diffroute.metrics.fidelity import paired_psnr_difference, psnr_summary

    b = torch.logspace(-1, -5, 64, dtype=torch.float64)[torch.randperm(64, generator=torch.Generator().manual_seed(0))]
    d, db = paired_psnr_difference(b / 2, b), 10 * np.log10(2)
    assert d["psnr_mean_diff_db"] == pytest.approx(db) and d["psnr_mean_diff_ci95"] == pytest.approx([db, db])
    lo_a, _ = psnr_summary(b / 2)["psnr_mean_vs_full_ci95"]
    _, hi_b = psnr_summary(b)["psnr_mean_vs_full_ci95"]
    assert lo_a < hi_b  # unpaired, the same two plans would not be told apart
    noisy = paired_psnr_difference(b * torch.logspace(-0.3, 0.3, 64, dtype=torch.float64), b)
    lo, hi = noisy["psnr_mean_diff_ci95"]
    assert lo < noisy["psnr_mean_diff_db"] < hi and lo < 0 < hi  # as many images better as worse: 0 inside
    with pytest.raises(ValueError, match="same images"):
        paired_psnr_difference(b[:3], b)


def test_per_image_mse_is_returned_in_sample_order():
    from diffroute.metrics.fidelity import PerImageMSE

    m = PerImageMSE()
    ref = torch.zeros(2, 1, 2, 2, dtype=torch.float64)
    m.update(torch.full_like(ref, 0.3), ref, [2, 3])
    m.update(torch.full_like(ref, 0.1), ref, [0, 1])
    torch.testing.assert_close(m.compute(), torch.tensor([0.01, 0.01, 0.09, 0.09], dtype=torch.float64))


def test_fd_bootstrap_interval_and_feature_bank_order():
    from diffroute.metrics.frechet import FeatureBank, _fd_of, fd_interval

    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 4, generator=g, dtype=torch.float64)
    near, far = a + 0.2 + 0.1 * torch.randn(300, 4, generator=g), a + 0.6
    lo, hi = fd_interval(near, a, paired=True)
    assert lo <= _fd_of(near, a) <= hi and lo < hi
    assert fd_interval(far, a, paired=True)[0] > hi  # a larger shift: a separated interval
    assert fd_interval(near, a, paired=True) == [lo, hi]  # fixed seed: reproducible
    # Few images in many dimensions: resampling with repeats inflates FD, the interval must still hold the estimate.
    x, y = torch.randn(64, 32, generator=g, dtype=torch.float64), torch.randn(64, 32, generator=g, dtype=torch.float64)
    lo, hi = fd_interval(x, y, paired=False)
    assert lo <= _fd_of(x, y) <= hi

    bank = FeatureBank(torch.nn.Flatten())
    images = torch.arange(24.0).reshape(6, 4)
    for idx in ([4, 5], [0, 1], [2, 3]):  # chunks arrive in any order (processes, resumes)
        bank.update(images[idx], idx)
    assert torch.equal(bank.compute(), images.double())


def test_fd_band_against_a_known_answer():
    """Gaussians N(0, I) and N(delta, I) have FD |delta|^2 exactly. With many images per dimension the bootstrap band
    holds that true value in most draws; with few, the plug-in FD's upward bias moves the band above it in many
    draws: a band around the estimate, not a confidence interval for the true FD (as fd_interval's docstring says)."""
    from diffroute.metrics.frechet import fd_interval

    g = torch.Generator().manual_seed(1)

    def coverage(n, d, draws=40):
        delta = torch.full((d,), 0.3, dtype=torch.float64)
        true, held = float(delta.square().sum()), 0
        for r in range(draws):
            a = torch.randn(n, d, generator=g, dtype=torch.float64)
            b = torch.randn(n, d, generator=g, dtype=torch.float64) + delta
            lo, hi = fd_interval(a, b, paired=False, n_boot=100, seed=r)
            held += lo <= true <= hi
        return held / draws

    assert coverage(300, 4) >= 0.8
    assert coverage(100, 8) <= 0.7


def test_dominance_of_peer_settings_by_shipped_schedules():
    from diffroute.eval.reports import dominance, dominance_table, plan_kind

    def row(plan, speed, fd, psnr, q3=None, fd_band=None, psnr_band=None):
        r = {"plan": plan, "speedup_transformer": speed, "fd_vs_full": fd, "psnr_mean_vs_full_db": psnr}
        r.update(speedup_transformer_q3=q3 or speed, fd_vs_full_ci95=fd_band, psnr_mean_vs_full_ci95=psnr_band)
        return r

    plans = [
        row("full", 1.0, 0.0, None),
        row("fora-2", 1.9, 0.1, 27.0),  # ours, not shipped: never counts as a dominator
        row("emoji:fast", 1.5, 0.05, 30.0, q3=1.62),
        row("emoji:fastest", 2.5, 0.3, 21.0),
        row("diffusers:fbc-0.2", 1.4, 0.06, 29.0, fd_band=[0.055, 0.07], psnr_band=[28.5, 29.5]),  # emoji:fast, both
        row("diffusers:pab-3", 2.0, 0.2, 20.0),  # by emoji:fastest in PSNR only (FD 0.3 > 0.2)
        row("cachedit:dbcache-F1B0-0.05", 1.02, 0.0, None),  # identical to full: nothing shipped is as good
        # slower than emoji:fast's median but within its quartile; better FD, but not beyond this peer's band
        row("diffusers:mag-0.1", 1.6, 0.052, 28.0, fd_band=[0.045, 0.06], psnr_band=[27.0, 29.0]),
    ]
    result = {"plans": {r["plan"].replace(":", "_"): r for r in plans}}
    assert [plan_kind(r["plan"]) for r in plans[:3]] == ["ours", "ours", "shipped"]
    got = {d["peer"]: d for d in dominance(result)}
    assert got["diffusers:fbc-0.2"]["by_both"] == ["emoji:fast"]
    assert got["diffusers:pab-3"]["by_fd"] == [] and got["diffusers:pab-3"]["by_psnr"] == ["emoji:fastest"]
    assert not any(got["cachedit:dbcache-F1B0-0.05"][k] for k in ("by_fd", "by_psnr"))
    assert got["diffusers:mag-0.1"]["by_fd"] == [] and got["diffusers:mag-0.1"]["by_psnr"] == ["emoji:fast"]
    assert "1 of 4 peer settings dominated in both (1 by FD, 3 by PSNR)" in dominance_table(result)


def test_the_plot_shows_the_mean_per_image_psnr_without_full(tmp_path):
    from diffroute.eval.reports import panels, plot

    def row(plan, fd, pooled, mean=None):
        return {"plan": plan, "speedup_transformer": 1.0, "fd_vs_full": fd, "psnr_vs_full_db": pooled} | (
            {} if mean is None else {"psnr_mean_vs_full_db": mean}
        )

    now = {"plans": {"full": row("full", 0.0, None, 60.0), "fora-2": row("fora-2", 0.1, 25.0, 31.0)}}
    (fd, _, fd_rows), (key, label, rows) = panels(now)
    assert fd == "fd_vs_full" and [r["plan"] for r in fd_rows] == ["full", "fora-2"]
    # the measure the tables and the dominance use; full, at the per-image cap, is no point on it
    assert key == "psnr_mean_vs_full_db" and "mean per-image" in label
    assert [r["plan"] for r in rows] == ["fora-2"]
    old = {"plans": {"full": row("full", 0.0, None), "fora-2": row("fora-2", 0.1, 25.0)}}
    (_, label, rows) = panels(old)[1]
    assert "pooled" in label and [r["psnr_vs_full_db"] for r in rows] == [25.0]
    # a plan whose images equal full's (at the cap) and no FD (too few images): an empty panel, still a plot
    same = {"plans": {"full": row("full", None, None, 60.0), "fora-2": row("fora-2", None, None, 60.0)}}
    assert [(k, shown) for k, _, shown in panels(same)] == [("psnr_mean_vs_full_db", [])]
    plot(same, tmp_path / "p.png")
    plot({"plans": {"full": row("full", None, None)}}, tmp_path / "q.png")  # nothing measured at all
    assert (tmp_path / "p.png").stat().st_size > 0 and (tmp_path / "q.png").stat().st_size > 0


def test_the_plotted_line_runs_through_the_front_only():
    from diffroute.eval.reports import front_of

    def row(name, speed, psnr, fd):
        return {"plan": name, "speedup_transformer": speed, "psnr": psnr, "fd": fd}

    rows = [row("b", 1.6, 35.0, 0.02), row("a", 1.2, 40.0, 0.01), row("c", 1.5, 33.0, 0.01), row("d", 2.0, 28.0, 0.05)]
    rows.append(row("b2", 1.6, 35.0, 0.03))  # ties b in speed and PSNR: neither beats the other
    # c is slower and worse than b: off the line; the line runs from slow to fast
    assert [r["plan"] for r in front_of(rows, "psnr", higher=True)] == ["a", "b", "b2", "d"]
    # in FD (lower is better) c, as good as a and faster, takes a off the line; b beats its tie in speed b2
    assert [r["plan"] for r in front_of(rows, "fd", higher=False)] == ["c", "b", "d"]


def test_an_unknown_pairing_is_refused_before_any_work(tmp_path):
    from diffroute.eval.compare import CompareConfig, validate

    cfg = CompareConfig(model="tiny-pixart", plans=["fora-2"], prompts=["a", "b"], out=tmp_path, n=2)
    validate(cfg)  # the default pairing
    with pytest.raises(ValueError, match="pairing 'neighbors'"):
        validate(
            CompareConfig(
                model="tiny-pixart", plans=["fora-2"], prompts=["a", "b"], out=tmp_path, n=2, pairing="neighbors"
            )
        )


def test_eval_report_remakes_tables_from_stored_results_and_refuses_broken_ones(tmp_path):
    def row(plan, speed, fd, band, psnr, psnr_band):
        return {
            "plan": plan,
            "speedup_transformer": speed,
            "fd_vs_full": fd,
            "fd_vs_full_ci95": band,
            "psnr_mean_vs_full_db": psnr,
            "psnr_mean_vs_full_ci95": psnr_band,
        }

    plans = [
        row("full", 1.0, 0.0, [0.0, 0.0], 60.0, [60.0, 60.0]),
        row("emoji:fast", 1.5, 0.02, [0.01, 0.03], 34.0, [33.0, 35.0]),
        row("diffusers:fbc-0.2", 1.4, 0.06, [0.05, 0.07], 29.0, [28.5, 29.5]),
    ]
    (tmp_path / "results.json").write_text(json.dumps({"plans": {r["plan"]: r for r in plans}}))
    done = _cli("eval", "report", str(tmp_path), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["dominance"][0]["by_both"] == ["emoji:fast"]
    assert "1 of 1 peer settings dominated in both" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "speed_quality.png").is_file()
    (tmp_path / "results.json").write_text("{ broken")
    bad = _cli("eval", "report", str(tmp_path))
    assert bad.returncode == 2 and "results.json" in bad.stderr and "Traceback" not in bad.stderr
