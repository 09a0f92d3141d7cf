"""The diffroute demo page (gr.Blocks; HF Spaces style: `python app.py`): full compute beside a compute plan, the
time each took, PSNR, and the compute map of what was skipped; a second tab shows `eval compare` results."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import gradio as gr

from diffroute.app.heatmap import compute_map_image
from diffroute.app.service import MAX_BATCH, MAX_PROMPT_CHARS, MAX_SCHEDULE_BYTES, MAX_STEPS, DemoService
from diffroute.app.uploads import guarded_app_kwargs, stop_on_sigterm
from diffroute.runtime import Runtime
from diffroute.runtime.arguments import add_runtime_arguments, runtime_of
from diffroute.utils.imageio import NonFiniteImagesError

MAX_UPLOAD = MAX_SCHEDULE_BYTES  # Gradio refuses larger uploads before they reach the server's disk

DEFAULT_RESULTS = Path(__file__).resolve().parent.parent / "docs" / "compare"


def _summary(r, plan_name: str) -> str:
    psnr = "identical" if r.psnr_db is None else f"{r.psnr_db:.2f} dB"
    return (
        f"**Speedup {r.full_s / r.fast_s:.2f}×** (end-to-end wall-clock, this batch)  \n"
        f"full: {r.full_s:.3f} s · {plan_name}: {r.fast_s:.3f} s · transformer {r.stats.transformer_time_s:.3f} s  \n"
        f"PSNR vs full: {psnr} · computed {r.stats.computed_fraction:.0%} of component calls"
    )


def results_tab(results_dir: Path | None) -> None:
    folder = Path(results_dir) if results_dir else DEFAULT_RESULTS
    table, plot = folder / "results.md", folder / "speed_quality.png"
    if table.is_file():
        gr.Markdown(f"Results from `{folder}` (`diffroute eval compare`):\n\n" + table.read_text())
        if plot.is_file():
            gr.Image(str(plot), label="speed vs quality", show_label=True)
    else:
        gr.Markdown(f"No results in `{folder}`: run `diffroute eval compare --out {folder}` or pass `--results DIR`.")


def build_demo(model: str = "emoji", results_dir: Path | None = None, service: DemoService | None = None) -> gr.Blocks:
    service = service or DemoService(model)

    # gr.Progress as a default argument is how Gradio injects the progress tracker.
    def generate(prompt, steps, guidance, seed, batch, plan, schedule_file, progress=gr.Progress(track_tqdm=True)):  # noqa: B008
        try:
            r = service.generate(prompt, steps, guidance, seed, batch, plan, schedule_file)
        except (ValueError, FileNotFoundError, TypeError, NonFiniteImagesError) as e:
            raise gr.Error(str(e)) from None  # a handled bad request: a message for the user, no traceback
        name = Path(schedule_file).stem if schedule_file else plan
        return (r.full[0], r.fast[0]), r.full, r.fast, _summary(r, name), compute_map_image(r.stats)

    # Uploads are deleted hourly (those older than an hour) and all at shutdown.
    with gr.Blocks(title="diffroute demo", delete_cache=(3600, 3600)) as demo:
        gr.Markdown(
            f"# diffroute: the same image, less compute\nModel **{model}**"
            + (" (random weights: speed only)" if service.random_weights else "")
            + f". Plans: {', '.join(service.offered_plans)}, or upload a schedule JSON."
        )
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column(scale=1):
                    prompt = gr.Textbox(label="Prompt", max_length=MAX_PROMPT_CHARS, elem_id="prompt")
                    if service.examples:
                        gr.Examples([[e] for e in service.examples], inputs=[prompt], label="Held-out captions")
                    plan = gr.Dropdown(list(service.offered_plans), value="fora-3", label="Plan")
                    schedule = gr.File(label="…or a schedule JSON (≤ 1 MB)", file_types=[".json"], type="filepath")
                    steps = gr.Slider(1, MAX_STEPS, value=20, step=1, label="Steps")
                    guidance = gr.Slider(1.0, 10.0, value=4.5, step=0.5, label="Guidance scale")
                    seed = gr.Number(value=0, precision=0, label="Seed")
                    batch = gr.Slider(1, MAX_BATCH, value=4, step=1, label="Batch size")
                    go = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Column(scale=2):
                    slider = gr.ImageSlider(label="full  |  accelerated (drag)", type="pil", elem_id="slider")
                    summary = gr.Markdown(elem_id="speedup")
                    with gr.Row():
                        full_gallery = gr.Gallery(label="full compute", columns=4, height=180)
                        fast_gallery = gr.Gallery(label="with the plan", columns=4, height=180)
                    heatmap = gr.Image(label="compute map", type="pil", elem_id="heatmap")
            go.click(
                generate,
                inputs=[prompt, steps, guidance, seed, batch, plan, schedule],
                outputs=[slider, full_gallery, fast_gallery, summary, heatmap],
                api_name="generate",
            )
        with gr.Tab("Benchmark results"):
            results_tab(results_dir)
    demo.queue(default_concurrency_limit=1, max_size=32)
    return demo


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def launch(model: str, results: Path | None, host: str, port: int, runtime: Runtime | None = None) -> None:
    if host not in LOOPBACK:
        print(
            f"warning: serving on {host}: anyone who can reach this machine on port {port} can use the demo (it runs "
            "the model on this machine; no file a client names is opened, uploads are limited to 1 MB each, 20 a "
            "minute per client and 64 MB in all, and deleted at shutdown). Put it behind an authenticating proxy if "
            "the network is not yours.",
            file=sys.stderr,
        )
    service = DemoService(model, runtime=runtime)
    stop_on_sigterm()
    build_demo(model, results, service).launch(
        server_name=host, server_port=port, max_file_size=MAX_UPLOAD, app_kwargs=guarded_app_kwargs()
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="emoji", help="zoo name or pipeline folder")
    p.add_argument("--results", type=Path, default=None, help="an `eval compare` folder (default: docs/compare)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (loopback: only this machine)")
    p.add_argument("--port", type=int, default=7860, help="port")
    add_runtime_arguments(p)
    args = p.parse_args(argv)
    launch(args.model, args.results, args.host, args.port, runtime_of(args))


if __name__ == "__main__":
    main()
