"""In-loop downstream evaluation (`eval.interval=N eval.tasks=[...]`), called by the Trainer
after validation. Runs on the training layout: every rank takes part, each data-parallel rank
scores its share of the requests, and rank 0 logs one record per evaluation
({'step', 'tokens_seen', 'eval/<task>/<metric>': value}) to metrics.jsonl and W&B."""

from __future__ import annotations

import logging
import time
from typing import Any

from titan.config.schema import TrainConfig
from titan.eval.harness import evaluate, flat_scores

log = logging.getLogger("titan")


class DownstreamEval:
    def __init__(self, cfg: TrainConfig, components: Any, env: Any):
        self.cfg, self.c, self.env = cfg.eval, components, env
        self.max_length = cfg.training.seq_len
        self.last: dict[str, float] = {}  # the latest scores, for the run summary
        self._lm = None

    def enabled(self) -> bool:
        return self.cfg.interval > 0 and bool(self.cfg.tasks)

    def _model(self):
        if self._lm is None:
            from titan.eval.lm import TitanLM
            from titan.parallel.mesh import group_of

            par = self.c.parallel
            sequence_parallel = par.tp_enabled and par.cfg.sequence_parallel
            self._lm = TitanLM(
                self.c.model, self.c.tokenizer, self.max_length, batch_size=self.cfg.batch_size,
                max_gen_tokens=self.cfg.max_gen_tokens, device=par.device, dp_rank=par.dp_rank,
                dp_world=par.dp_world, dp_group=group_of(par.mesh, "dp"),
                pad_multiple=par.degrees["tp"] if sequence_parallel else 1,
                forward_context=self.c.precision.autocast,
            )
        return self._lm

    def __call__(self, step: int, last_step: int, tokens_seen: int, metrics: Any) -> None:
        if not self.enabled() or (step % self.cfg.interval and step != last_step):
            return
        started = time.perf_counter()
        model = self.c.model
        model.eval()
        try:
            scores, _ = evaluate(self._model(), self.cfg.tasks, self.cfg.limit, self.cfg.num_fewshot,
                                 self.cfg.include_path, self.cfg.seed)
        finally:
            model.train()
        if not self.env.is_main or not scores:
            return
        self.last = flat_scores(scores)
        metrics.log({"step": step, "tokens_seen": tokens_seen, **self.last, "eval_s": time.perf_counter() - started})
