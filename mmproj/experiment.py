"""An experiment = train the configured model, optionally a blind baseline, evaluate both, write results.json.

The blind baseline is the same LM and training budget with no visual tokens (`model.use_image=False`); the gap
between the two is what the projector carries. It trains in WORKDIR/blind/.
Shapes-world runs are evaluated by VQA accuracy and caption loss; other data (LLaVA-format JSON) reports the
training loss of the last log interval (evaluate those with mmproj.load + mmproj.generate). A config with
objective='qformer_stage1' is BLIP-2's first stage instead (mmproj/qformer_stage1.py: the Q-Former alone on the
frozen ViT; default objective: 'lm', the multimodal LM's next-token loss). A draw-task run (data.task='draw', a
model with an output side) is evaluated by text -> image match rates (mmproj/eval/draw.py) next to the generator
driven by its own text encoder, and writes a grid of its pictures to WORKDIR/draw_samples.png (a column per
caption of results.json's sample_captions: the pipeline's picture over the reference's).
"""
from __future__ import annotations

import json
import math

import jax
from etils import epath

from mmproj import model as model_lib
from mmproj import qformer_stage1, stage0, stage0_generator
from mmproj.data import worlds
from mmproj.eval import vqa
from mmproj.train import paths, trainer


def blind_config(cfg):
  """The same run without the image: no encoder or projector (nor their cfg.init), the LM's init kept."""
  blind = cfg.copy_and_resolve_references()
  blind.model.use_image = False
  blind.init.encoder = blind.init.projector = None
  return blind


def _evaluate(result: trainer.TrainResult, cfg) -> tuple[dict, float]:
  kwargs = dict(batch_size=int(cfg.eval.batch_size), max_examples=cfg.eval.max_examples)
  acc = vqa.vqa_accuracy(result.setup, result.state.params, result.tokenizer,
                         max_new_tokens=int(cfg.eval.max_new_tokens), **kwargs)
  return acc, vqa.caption_loss(result.setup, result.state.params, result.tokenizer, **kwargs)


def format_table(results: dict, modality: str = 'image') -> str:
  """The per-family table of a run's results.json: the model with its medium (column `modality`), the blind
  baseline, the gain, chance."""
  image, blind, chance = results['vqa_accuracy'], results.get('blind_vqa_accuracy'), results.get('chance')
  header = (f'{"family":<10} {modality:>7}' + (f' {"blind":>7} {"gain":>7}' if blind else '')
            + (f' {"chance":>7}' if chance else ''))
  lines = [header, '-' * len(header)]
  for family in image:
    line = f'{family:<10} {image[family]:>7.1%}'
    if blind:
      line += f' {blind[family]:>7.1%} {100 * (image[family] - blind[family]):>+6.1f}p'
    if chance:
      line += f' {chance[family]:>7.1%}'
    lines.append(line)
  lines.append(f'caption loss: {results["caption_loss"]:.3f}'
               + (f' (blind {results["blind_caption_loss"]:.3f})' if blind else ''))
  lines.append(f'steps: {results["steps"]}, train time: {results["train_seconds"]:.0f}s'
               + (f' (+ blind {results["blind_train_seconds"]:.0f}s)' if blind else ''))
  return '\n'.join(lines)


def _last_metrics(workdir: str) -> dict:
  path = epath.Path(paths.join(workdir, 'metrics.jsonl'))
  lines = [line for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
  return json.loads(lines[-1]) if lines else {}


def _write_results(workdir: str, results: dict, towers: dict | None, generator: dict | None = None) -> str:
  """results.json, with the stage-0 towers the run read (stage0.provenance) under 'stage0' and the stage-0
  generator (stage0_generator.provenance) under 'stage0_generator' (both also added to results)."""
  if towers:
    results['stage0'] = towers
  if generator:
    results['stage0_generator'] = generator
  path = paths.join(workdir, 'results.json')
  clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in results.items()}
  paths.write_text(path, json.dumps(clean, indent=2))
  return path


def run(cfg, workdir: str) -> dict:
  workdir = paths.resolve(workdir)          # a local directory or a URL (gs://bucket/run): mmproj/train/paths.py
  resolved = stage0.resolve_init(cfg)       # cfg.init 'stage0' entries: the towers of cfg.stage0, built if missing
  towers = stage0.provenance(cfg)           # which weights those are (results.json's 'stage0')
  cfg = stage0_generator.resolve_init(resolved)   # ... and the generator of cfg.generator
  generator = stage0_generator.provenance(resolved)
  objective = cfg.get('objective', 'lm')
  if objective == qformer_stage1.OBJECTIVE:
    return qformer_stage1.run(cfg, workdir, towers=towers)
  if objective != 'lm':
    raise ValueError(f'objective={objective!r}: expected "lm" or {qformer_stage1.OBJECTIVE!r}')
  baseline = str(cfg.baseline or '').lower()
  if baseline not in ('blind', '', 'none'):
    raise ValueError(f'baseline={cfg.baseline!r}: the only baseline is "blind" ("" or "none" for no baseline)')
  if cfg.data.name not in worlds.WORLDS:
    if baseline == 'blind':
      raise ValueError(f'baseline="blind" is evaluated in the procedural worlds only {worlds.WORLDS} '
                       f'(data.name={cfg.data.name!r})')
    main = trainer.train(cfg, workdir)
    results = {'steps': int(cfg.train.steps), 'train_seconds': round(main.train_seconds, 1),
               'last_metrics': _last_metrics(workdir)}
    if jax.process_index() == 0:
      path = _write_results(workdir, results, towers)
      print(f'trained {results["steps"]} steps in {results["train_seconds"]:.0f}s; last log: '
            f'{results["last_metrics"]}\nresults: {path}', flush=True)
    return results
  if cfg.data.get('task') == 'draw':
    return _run_draw(cfg, workdir, towers, generator)
  modality = model_lib.modality(cfg.model)          # what the model reads: image, audio or video
  main = trainer.train(cfg, workdir, name=f'[{modality}] ' if baseline == 'blind' else '')
  accuracy, cap_loss = _evaluate(main, cfg)
  results = {'vqa_accuracy': accuracy, 'caption_loss': cap_loss, 'steps': int(cfg.train.steps),
             'train_seconds': round(main.train_seconds, 1), 'chance': worlds.world(cfg.data).chance_levels(cfg.data)}
  if baseline == 'blind':
    blind = trainer.train(blind_config(cfg), paths.join(workdir, 'blind'), name='[blind] ')
    blind_accuracy, blind_loss = _evaluate(blind, cfg)
    results.update(blind_vqa_accuracy=blind_accuracy, blind_caption_loss=blind_loss,
                   blind_train_seconds=round(blind.train_seconds, 1))
  if jax.process_index() == 0:
    path = _write_results(workdir, results, towers)
    print(format_table(results, modality), flush=True)
    print(f'results: {path}', flush=True)
  return results


def format_draw_table(results: dict) -> str:
  pipe, ref = results['draw']['pipeline'], results['draw']['reference']
  header = f'{"attribute":<10} {"pipeline":>9} {"reference":>9} {"gap":>7}'
  lines = [header, '-' * len(header)]
  lines += [f'{k:<10} {pipe[k]:>9.1%} {ref[k]:>9.1%} {100 * (pipe[k] - ref[k]):>+6.1f}p' for k in pipe]
  d = results['draw']
  lines.append(f'signal tokens emitted: first {d["signal_first"]:.1%}, all {d["signal_exact"]:.1%}; conditioning '
               f'MSE to the text encoder\'s {d["condition_mse"]:.4f}; {d["examples"]} test captions')
  lines.append(f'steps: {results["steps"]}, train time: {results["train_seconds"]:.0f}s')
  return '\n'.join(lines)


def _run_draw(cfg, workdir: str, towers: dict | None, generator: dict | None) -> dict:
  from mmproj.eval import draw
  main = trainer.train(cfg, workdir)
  figures = draw.draw_accuracy(main.setup, main.state.params, main.tokenizer, batch_size=int(cfg.eval.batch_size),
                               max_examples=cfg.eval.max_examples, steps=int(cfg.eval.draw_steps),
                               guidance=float(cfg.eval.draw_guidance), seed=int(cfg.eval.draw_seed))
  samples = figures.pop('samples')
  results = {'draw': figures, 'sample_captions': samples['captions'], 'steps': int(cfg.train.steps),
             'train_seconds': round(main.train_seconds, 1), 'last_metrics': _last_metrics(workdir)}
  if jax.process_index() == 0:
    path = _write_results(workdir, results, towers, generator)
    epath.Path(paths.join(workdir, 'draw_samples.png')).write_bytes(draw.samples_png(samples))
    print(format_draw_table(results), flush=True)
    print(f'results: {path}', flush=True)
  return results
