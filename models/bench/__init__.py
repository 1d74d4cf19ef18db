"""`das bench`: the model-level benchmark. Does skipping layers buy the latency its FLOPs promise?

For a ViLT backbone of ViLT-B/32 size (transformers' default ``ViltConfig`` with a 3129-answer VQA
head, randomly initialised: timing does not depend on the weights' values), written to a temporary
directory with ``save_vilt_checkpoint`` and read back with ``ViltBackbone.from_pretrained`` (the
loading path the service uses), the benchmark times ``DASRuntime.vqa_logits`` under
``torch.inference_mode`` for the built-in full plan and for plans that skip 2, 4 and 6 layers (skip
adapters of bottleneck 192, no parallel adapters).

Inputs are made once per batch size and preprocessed once (images resized by the checkpoint's
processor to 384x384, questions of 16 tokens including [CLS]/[SEP]); only the forward pass is
timed. Latency is the median of ``--repeats`` timed runs after ``--warmup`` untimed rounds. The plans
are interleaved round-robin (every round runs each plan once, and the starting plan rotates), so
drifts in machine speed hit all plans alike. On a shared machine, a round during which other
processes used more than ``--max-others-cpu`` of the CPUs (read from /proc/stat) is replaced by an
extra one (at most ``--extra-rounds``), and the quietest rounds are kept; the table reports the
share other processes still took ("others' CPU").

The FLOPs are ``backbone.flops(...)`` for the actual input. The speedup efficiency of a plan is the
fraction of latency it saves divided by the fraction of FLOPs it saves: 1.0 means the saved FLOPs
turn into saved time one for one. Targets: >= 0.9 at batch >= 32, >= 0.8 below (PASS/MISS per row).
This is a measurement, not a test: the exit status is 0 whatever the efficiency.

``--arch meter`` runs the same benchmark on a METER-size backbone (``MeterConfig()``: CLIP-ViT-B/16
at 288 px, RoBERTa-base, 6 fusion layers per stream, 3129-answer VQA head, random init, written with
``save_meter_checkpoint``); its 12 arms are the fusion layers (0-5 text side, 6-11 image side), skip
adapters of bottleneck 288 (the DAS reference's), results in ``bench-runtime-meter.{json,md}``.

``--size embedded`` times the embedded default instead (``plans/``: the shipped backbone and its
trained VQA plans skip2 and skip4, adapters as trained). That backbone checkpoint has no VQA head,
so its "full" plan is built here from the shipped ``adapters`` plan: the same pooler and head, no
adapters, no skipped layer (:func:`full_plan_with_parts_of`). Questions are 16 tokens of the
synthetic world's words; results go to ``bench-runtime-embedded.{json,md}``.
"""
