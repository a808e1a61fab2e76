"""
The evaluation metrics of NPR.md section 6, from finished samples: accuracy, format validity, the
parallel trigger rate, branches per fork, tokens/s, time-to-answer and total / critical-path tokens.
eval.py reports them, grpo.py logs them for its rollouts and its periodic evaluation, table.py reads
eval.py's reports. `evaluate` is the decoding both scripts evaluate with.
"""
import npr


def is_parallel(text_or_parsed) -> bool:
    """Parallel trigger: at least one block with >= 2 steps (a block that forked into >= 2 branches)."""
    p = npr.parse(text_or_parsed) if isinstance(text_or_parsed, str) else text_or_parsed
    return any(len(b.steps) >= 2 for b in p.blocks)


def sample_metrics(samples, wall_s):
    """samples: [(Sample, gold answer)]; wall_s: generation wall time -> the metrics of NPR.md section 6,
    plus finish reasons. A serial-mode sample triggers when its text holds a block with >= 2 steps."""
    n = max(len(samples), 1)
    forks = [b for s, _ in samples for b in s.stats["branches_per_fork"]]
    total = sum(s.stats["total_tokens"] for s, _ in samples)
    crit = sum(s.stats["critical_path_tokens"] for s, _ in samples)
    triggered = [is_parallel(s.text) if s.stats.get("mode") == "serial"
                 else any(b >= 2 for b in s.stats["branches_per_fork"]) for s, _ in samples]
    valid = [s.finish_reason == "eos" and npr.format_score(s.text)[0] == 0.0 for s, _ in samples]
    return dict(
        samples=len(samples),
        accuracy=sum(npr.grade(s.text, a) for s, a in samples) / n,
        format_valid=sum(valid) / n, trigger_rate=sum(triggered) / n,
        branches_per_fork=sum(forks) / len(forks) if forks else 0.0,
        tokens_per_s=total / wall_s if wall_s else 0.0,
        time_to_answer_s=sum(s.stats["time_s"] for s, _ in samples) / n,
        total_over_critical=total / crit if crit else 0.0,
        mean_tokens=total / n, mean_critical_tokens=crit / n,
        finish={r: sum(s.finish_reason == r for s, _ in samples) / n
                for r in sorted({s.finish_reason for s, _ in samples})},
    )


def evaluate(sampler, tok, problems, instruction, params, k=1, batch_rows=256, progress=False):
    """k samples of each problem ({"question", "answer"}), prompted with `instruction`, decoded with
    params in batches of batch_rows rows -> (sample_metrics of them all, the samples of each problem)."""
    prompts = [npr.chat_prompt(tok, p["question"], instruction) for p in problems]
    got, wall = sampler.generate_many(prompts, k, params, progress=progress, batch_rows=batch_rows)
    return sample_metrics([(s, p["answer"]) for p, ss in zip(problems, got) for s in ss], wall), got
