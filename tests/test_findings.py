"""The published-findings sweeps (experiments/findings/e*.py) and their report (experiments/findings.py): every cell
of every full grid builds, the verdict rule and the claim statistics on hand-made results, the scenes stage options,
and the six smoke sweeps end to end (one sweep invocation sharing a workdir, then the report)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from experiment_utils import REPO, python_env

sys.path.insert(0, os.path.join(REPO, 'experiments'))
import findings  # noqa: E402
import sweep as sweep_tool  # noqa: E402

from mmproj import config_lib  # noqa: E402

FAST = ['--set', 'train.steps=4', '--set', 'train.warmup_steps=1', '--set', 'checkpoint.every=2',
        '--set', 'log_every=2', '--set', 'eval.max_examples=16', '--set', 'eval.batch_size=16']


@pytest.mark.parametrize('spec', [f + v for f in findings.FINDINGS for v in ('', ':smoke')])
def test_every_cell_of_every_finding_builds(spec, tmp_path):
  sweep = sweep_tool.load_sweep(spec)
  findings.check_finding(spec.partition(':')[0], sweep_tool.load_sweep(spec.partition(':')[0]))
  for r in sweep_tool.runs_of(sweep, str(tmp_path))[:len(sweep.cells)]:      # one seed
    cfg = config_lib.load_config_file(os.path.join(REPO, r.config.partition(':')[0]) + ':' + r.config.partition(':')[2],
                                      [f'{k}={sweep_tool._literal(v)}' for k, v in r.overrides])
    assert cfg.baseline == 'none'
    for need in r.needs:                                  # a later stage starts from the run it names
      assert cfg.init.projector == need and need.startswith(str(tmp_path))
  if not spec.endswith(':smoke'):
    assert sweep.seeds == [0, 1, 2]


def test_the_findings_grids_share_their_common_cells(tmp_path):
  """One workdir for all six: 129 distinct runs (69 stage-2 runs, 57 align runs, 3 BLIP-2 stage-1 runs), and the
  print-commands waves put every run after the ones it starts from."""
  runs = sweep_tool.merge_runs([(s, sweep_tool.runs_of(sweep_tool.load_sweep(s), str(tmp_path)))
                                for s in findings.FINDINGS])
  assert len(runs) == 129
  assert sum(',align' in r.config for r in runs) == 57 and sum(',pretrain' in r.config for r in runs) == 3
  waves = sweep_tool.waves(runs)
  assert [len(w) for w in waves] == [60, 66, 3]       # stage 1 / one-stage runs; stage 2; after BLIP-2's stage 1
  seen = set()
  for wave in waves:
    assert all(n in seen for r in wave for n in r.needs)
    seen |= {r.workdir for r in wave}


def test_scenes_stage_options():
  load = lambda arg: config_lib.load_config_file(os.path.join(REPO, 'configs/scenes.py') + ':' + arg)
  joint, align, instruct = load('mlp'), load('mlp,align'), load('mlp,instruct,frozen_lm')
  assert (joint.data.turns, joint.data.caption_prob, joint.train.frozen) == (8, 1.0, ['encoder/.*'])
  assert (align.data.turns, align.data.caption_prob, align.train.steps) == (1, 1.0, config_lib.ALIGN_STEPS)
  assert align.train.frozen == ['encoder/.*', config_lib.FROZEN_LM]
  assert (instruct.data.caption_prob, instruct.train.steps) == (0.0, config_lib.INSTRUCT_STEPS)
  assert align.eval.max_examples == config_lib.ALIGN_EVAL_EXAMPLES and joint.eval.max_examples is None
  assert instruct.train.frozen == ['encoder/.*', config_lib.FROZEN_LM]
  import re
  frozen = re.compile(config_lib.FROZEN_LM)
  assert frozen.fullmatch('lm/layers_0/mlp/kernel') and not frozen.fullmatch('lm/xattn_layers_1/gate_attn')
  pretrain = load('qformer,pretrain')
  assert (pretrain.objective, pretrain.init.lm, pretrain.train.learning_rate) == ('qformer_stage1', None, 1e-3)
  with pytest.raises(ValueError, match='at most one of align / instruct / pretrain'):
    load('mlp,align,instruct')
  with pytest.raises(ValueError, match="option pretrain is BLIP-2's Q-Former stage 1; projector 'mlp'"):
    load('mlp,pretrain')
  with pytest.raises(ValueError, match="unknown or repeated option 'fast'"):
    load('mlp,fast')


@pytest.mark.parametrize('values, predict, word', [
    ([3.0, 4.0, 5.0], 'greater', 'agrees'),             # 4 ± 2.5: above 0
    ([-3.0, -4.0, -5.0], 'greater', 'disagrees'),
    ([-1.0, 2.0, 5.0], 'greater', 'inconclusive'),      # 2 ± 7.5
    ([1.0, 0.0, -1.0], 'similar', 'agrees'),            # 0 ± 2.5: inside ± 5
    ([9.0, 10.0, 11.0], 'similar', 'disagrees'),        # 10 ± 2.5: beyond 5
    ([2.0, 5.0, 8.0], 'similar', 'inconclusive'),       # 5 ± 7.5
    ([3.0], 'greater', 'no verdict (fewer than 2 seeds)'),
])
def test_verdict_rule(values, predict, word):
  assert findings.verdict(values, predict)[2] == word


def _write_results(root, cell, seed, accuracy, probe=None):
  d = os.path.join(root, cell, f'seed{seed}')
  os.makedirs(d, exist_ok=True)
  with open(os.path.join(d, 'results.json'), 'w') as f:
    json.dump({'vqa_accuracy': accuracy}, f)
  if probe is not None:
    with open(os.path.join(d, 'probe.json'), 'w') as f:
      json.dump({'accuracy': probe}, f)


def test_claim_statistics_on_hand_made_results(tmp_path):
  root = str(tmp_path)
  sweep = sweep_tool.load_sweep('experiments/findings/e3_linear_mlp.py')
  for seed, (lin, mlp, mlp6) in enumerate([(0.50, 0.60, 0.58), (0.52, 0.57, 0.60), (0.49, 0.61, 0.55)]):
    for cell, v in (('linear', lin), ('mlp', mlp), ('mlp6', mlp6)):
      _write_results(root, cell, seed, {'overall': v}, probe={'occupancy': v / 2})
  runs = sweep_tool.runs_of(sweep, root)
  difference, spread = sweep.claims
  assert findings.claim_values(difference, runs, [0, 1, 2]) == pytest.approx({0: 10.0, 1: 5.0, 2: 12.0})
  assert findings.claim_values(spread, runs, [0, 1, 2]) == pytest.approx({0: 10.0, 1: 8.0, 2: 12.0})
  probe = dict(difference, metric='probe', families=['occupancy'])
  assert findings.claim_values(probe, runs, [0, 1]) == pytest.approx({0: 5.0, 1: 2.5})
  # The spread statistic on a 2 x 2 grid: over M (4 -> 9) type a moves 10, type b 20 (mean 15); over types, at M = 4
  # they differ by 0, at M = 9 by 10 (mean 5): d = 15 - 5 = 10.
  for cell, v in (('a4', 0.4), ('a9', 0.5), ('b4', 0.4), ('b9', 0.6)):
    _write_results(root, cell, 0, {'overall': v})
  grid = dict(id='t', statistic='spread', grid=[['a', 4, 'a4'], ['a', 9, 'a9'], ['b', 4, 'b4'], ['b', 9, 'b9']],
              families=['overall'])
  runs = [sweep_tool.Run(cell=c, seed=0, config='', overrides=(), workdir=os.path.join(root, c, 'seed0'))
          for c in ('a4', 'a9', 'b4', 'b9')]
  assert findings.claim_values(grid, runs, [0]) == pytest.approx({0: 10.0})
  # A seed where one cell has not finished gives no value.
  os.remove(os.path.join(root, 'b9', 'seed0', 'results.json'))
  assert findings.claim_values(grid, runs, [0]) == {}


def test_smoke_findings_end_to_end(stage0_smoke, tmp_path):
  """All six smoke sweeps in one invocation (9 runs; BLIP-2's stage 1 runs before the Q-Former that starts from
  it), then the report: tables, the verdict rows of all twelve claims, the E6 probes; question_errors on a run."""
  recipe, _ = stage0_smoke
  work, out = tmp_path / 'work', tmp_path / 'out'
  env = python_env()
  common = ['--workdir', str(work), '--set', f'data.data_dir={recipe.data.data_dir}', '--set',
            f'stage0.cache_dir={recipe.cache_dir}', *FAST]
  ran = subprocess.run([sys.executable, 'experiments/sweep.py', 'experiments/findings/e*.py:smoke', *common,
                        '--jobs', '2', '--out', str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=900)
  assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-4000:]
  assert 'sweep: 9 runs, 0 finished, 9 to run' in ran.stdout
  order = [line.split('] ')[1].split(' seed')[0] for line in ran.stdout.splitlines() if line.startswith('[')]
  assert order.index('qformer.stage1') < order.index('qformer.pretrained')
  pretrained_cfg = json.loads((work / 'qformer.pretrained' / 'seed0' / 'config.json').read_text())
  assert pretrained_cfg['init']['projector'] == str(work / 'qformer.stage1' / 'seed0')
  stage1 = json.loads((work / 'qformer.stage1' / 'seed0' / 'results.json').read_text())
  assert set(stage1['qformer_stage1']) >= {'itc', 'itm', 'itg', 'loss', 'retrieval'}

  text = findings.report(str(work), str(out), smoke=True, log=lambda msg: None)
  assert (out / 'findings_smoke.md').read_text() == text
  for claim in ('E1a', 'E1b', 'E1c', 'E2', 'E3a', 'E3b', 'E4a', 'E4b', 'E5a', 'E5b', 'E6a', 'E6b'):
    assert f'| {claim} | ' in text
  assert text.count('no verdict (fewer than 2 seeds)') == 2 * 12     # summary and per-finding tables
  assert '| E4b | with the LM trained, concatenation scores higher than gated cross-attention | not run | 0 |' in text
  assert findings.RULE in text and text.count('## E') == 6
  for cell in ('mlp', 'perceiver'):                      # E6b's probes, written beside the runs and copied
    probe = json.loads((work / cell / 'seed0' / 'probe.json').read_text())
    assert 0 <= probe['accuracy']['occupancy'] <= 1
    assert (out / 'findings_smoke' / cell / 'seed0' / 'probe.json').exists()
  assert (out / 'findings_smoke_verdicts.png').stat().st_size > 0
  # The copies alone rebuild the same report (the probes are not run again: no checkpoints there).
  again = findings.report(str(out / 'findings_smoke'), str(tmp_path / 'again'), smoke=True, log=lambda msg: None)
  strip = lambda t: [line for line in t.splitlines() if not line.startswith(('Every run', 'This report', 'Runs:',
                                                                             'Command:'))]
  assert strip(again) == strip(text)
  # experiments/question_errors.py on one of the runs: every question counted once, every wrong answer sorted.
  import question_errors
  got = question_errors.errors(str(work / 'mlp' / 'seed0'), 'color', limit=24)
  assert got['questions'] == sum(v['questions'] for v in got['by_objects'].values()) > 0
  right = sum(round(v['accuracy'] * v['questions']) for v in got['by_objects'].values())
  assert sum(got['wrong_answers'].values()) == got['questions'] - right


def test_place_takes_a_connectors_blocks_in_the_lm_and_a_stage1_qformers_query_side():
  """pretrained.place: a gated_xattn workdir's lm/xattn_layers_* go over the LM from init.lm; a BLIP-2 stage-1 run
  gives the Q-Former's query side (its text side and heads stay behind) and language_projection stays fresh."""
  import jax
  import numpy as np

  from mmproj.train import pretrained
  full = lambda shape, v: np.full(shape, v, np.float32)
  params = {'projector': {'query_tokens': full((2, 3), 0), 'language_projection': {'kernel': full((3, 4), 1)},
                          'qformer': {'layers_0': {'w': full((3, 3), 0)}}},
            'lm': {'layers_0': {'w': full((2, 2), 0)}, 'xattn_layers_0': {'w': full((2, 2), 0)}}}
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  shardings = jax.tree.map(lambda _: device, params)

  def got(tree, *path):
    for key in path:
      tree = tree[key]
    return float(np.asarray(tree).ravel()[0])

  # An LM from init.lm alone: the gated blocks keep their fresh values.
  out = pretrained.place(params, {'lm': {'layers_0': {'w': full((2, 2), 5)}}}, shardings)
  assert got(out, 'lm', 'layers_0', 'w') == 5 and got(out, 'lm', 'xattn_layers_0', 'w') == 0
  # ... and with a gated_xattn workdir as init.projector: its blocks.
  out = pretrained.place(params, {'lm': {'layers_0': {'w': full((2, 2), 5)}},
                                  'projector': params['projector'],
                                  pretrained.INJECTED: {'xattn_layers_0': {'w': full((2, 2), 9)}}}, shardings)
  assert got(out, 'lm', 'layers_0', 'w') == 5 and got(out, 'lm', 'xattn_layers_0', 'w') == 9
  # A stage-1 Q-Former: query side taken, text side and heads dropped, language_projection fresh.
  stage1 = {'query_tokens': full((2, 3), 7), 'qformer': {'layers_0': {'w': full((3, 3), 8)},
                                                         'word_embeddings': {'embedding': full((5, 3), 1)}}}
  out = pretrained.place(params, {'projector': stage1, pretrained.PARTIAL: True}, shardings)
  assert got(out, 'projector', 'query_tokens') == 7 and got(out, 'projector', 'qformer', 'layers_0', 'w') == 8
  assert got(out, 'projector', 'language_projection', 'kernel') == 1
  # A stage-1 run that lacks part of the query side is refused, naming the param.
  with pytest.raises(ValueError, match='projector/qformer/layers_0/w missing from the loaded weights'):
    pretrained.place(params, {'projector': {'query_tokens': full((2, 3), 7)}, pretrained.PARTIAL: True}, shardings)


def test_every_findings_connector_builds_and_gives_its_tokens(tmp_path):
  """Each distinct connector of the full grids, built for the stage-0 widths and applied to a 6 x 6 grid of ViT
  tokens: M as the finding names it (E2's 4, 9 and 36)."""
  import jax
  import jax.numpy as jnp

  from mmproj import model as model_lib, projectors
  seen = {}
  for spec in findings.FINDINGS:
    for r in sweep_tool.runs_of(sweep_tool.load_sweep(spec), str(tmp_path)):
      cfg = config_lib.load_config_file(os.path.join(REPO, r.config), [f'{k}={sweep_tool._literal(v)}'
                                                                       for k, v in r.overrides])
      seen[r.cell.removesuffix('.align').removesuffix('.frozen_lm').removesuffix('.one_stage')] = cfg.model
  assert {'avg_pool.m4', 'c_abstractor.m36', 'perceiver.m4', 'mlp6', 'gated_xattn'} <= set(seen)
  for cell, cfg_model in seen.items():
    m = model_lib.num_image_tokens(cfg_model)
    if cfg_model.projector.name == 'gated_xattn':
      continue                                      # its tokens enter the LM through cross-attention (E4 builds it)
    want = int(cell.rpartition('.m')[2]) if '.m' in cell else 36 if cell in ('linear', 'mlp', 'mlp6') else 9
    assert m == want, cell
    proj = projectors.build(cfg_model.projector, in_dim=cfg_model.encoder.width, out_dim=cfg_model.lm.width)
    x = jnp.ones((1, 36, cfg_model.encoder.width))
    y, _ = jax.eval_shape(lambda x: proj.init_with_output(jax.random.key(0), x, grid=(6, 6)), x)
    assert y.shape == (1, m, cfg_model.lm.width), cell
