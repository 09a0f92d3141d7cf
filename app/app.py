"""The diffroute demo page (gr.Blocks; HF Spaces style: `python app.py`): full compute beside a compute plan, the
time each took, PSNR, and the compute map of what was skipped; a second tab shows `eval compare` results."""

from __future__ import annotations

import argparse
from pathlib import Path

import gradio as gr

from diffroute.plans import PLAN_EXAMPLES, known_plan_names

from .heatmap import compute_map_image
from .service import MAX_BATCH, MAX_PROMPT_CHARS, MAX_STEPS, DemoService

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
        except (ValueError, FileNotFoundError, TypeError) as e:
            raise gr.Error(str(e)) from e
        name = Path(schedule_file).stem if schedule_file else plan
        return (r.full[0], r.fast[0]), r.full, r.fast, _summary(r, name), compute_map_image(r.stats)

    with gr.Blocks(title="diffroute demo") as demo:
        gr.Markdown(
            f"# diffroute: the same image, less compute\nModel **{model}**"
            + (" (random weights: speed only)" if service.random_weights else "")
            + f". Plans: {', '.join(known_plan_names())}, or upload a schedule JSON."
        )
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column(scale=1):
                    prompt = gr.Textbox(label="Prompt", max_length=MAX_PROMPT_CHARS, elem_id="prompt")
                    if service.examples:
                        gr.Examples([[e] for e in service.examples], inputs=[prompt], label="Held-out captions")
                    plan = gr.Dropdown(PLAN_EXAMPLES, value="fora-3", label="Plan", allow_custom_value=True)
                    schedule = gr.File(label="…or a schedule JSON", file_types=[".json"], type="filepath")
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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="emoji")
    p.add_argument("--results", type=Path, default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    args = p.parse_args(argv)
    build_demo(args.model, args.results).launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
