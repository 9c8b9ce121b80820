"""hpllm.perf.hlo on hand-written HLO text (what each count must be is read off the text)."""

import pytest

from hpllm.perf import hlo

TEXT = """\
HloModule jit_step, is_scheduled=true

%add (x: f32[], y: f32[]) -> f32[] {
  %lhs = f32[] parameter(0)
  %rhs = f32[] parameter(1)
  ROOT %sum = f32[] add(%lhs, %rhs)
}

%fused_dot (p0: f32[4,8], p1: f32[8,2]) -> f32[4,2] {
  %p0 = f32[4,8]{1,0} parameter(0)
  %p1 = f32[8,2]{1,0} parameter(1)
  ROOT %d = f32[4,2]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_slice (q0: f32[16,2], q1: s32[]) -> f32[4,2] {
  %q0 = f32[16,2]{1,0} parameter(0)
  %q1 = s32[] parameter(1)
  %zero = s32[] constant(0)
  ROOT %ds = f32[4,2]{1,0} dynamic-slice(%q0, %q1, %zero), dynamic_slice_sizes={4,2}
}

%body (carry: (f32[4,8], f32[8,2])) -> (f32[4,8], f32[8,2]) {
  %carry = (f32[4,8]{1,0}, f32[8,2]{1,0}) parameter(0)
  %a = f32[4,8]{1,0} get-tuple-element(%carry), index=0
  %w = f32[8,2]{1,0} get-tuple-element(%carry), index=1
  %cp = f32[4,8]{1,0} collective-permute-start(%a), channel_id=1, source_target_pairs={{0,1},{1,0}}
  %mm = f32[4,2]{1,0} fusion(%a, %w), kind=kOutput, calls=%fused_dot
  %cpd = f32[4,8]{1,0} collective-permute-done(%cp)
  %mm2 = f32[4,2]{1,0} fusion(%cpd, %w), kind=kOutput, calls=%fused_dot
  ROOT %t = (f32[4,8]{1,0}, f32[8,2]{1,0}) tuple(%cpd, %w)
}

%cond (c: (f32[4,8], f32[8,2])) -> pred[] {
  %c = (f32[4,8]{1,0}, f32[8,2]{1,0}) parameter(0)
  ROOT %true = pred[] constant(true)
}

ENTRY %main (x: f32[4,8], w: f32[8,2], i: s32[]) -> f32[] {
  %x = f32[4,8]{1,0} parameter(0)
  %w = f32[8,2]{1,0} parameter(1)
  %i = s32[] parameter(2)
  %ag = f32[16,8]{1,0} all-gather(%x), channel_id=2, dimensions={0}
  %big = f32[16,2]{1,0} dot(%ag, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %ars = f32[16,2]{1,0} all-reduce-start(%big), channel_id=3, to_apply=%add
  %ard = f32[16,2]{1,0} all-reduce-done(%ars)
  %mine = f32[4,2]{1,0} fusion(%ard, %i), kind=kLoop, calls=%fused_slice
  %init = (f32[4,8]{1,0}, f32[8,2]{1,0}) tuple(%x, %w)
  %loop = (f32[4,8]{1,0}, f32[8,2]{1,0}) while(%init), condition=%cond, body=%body
  %gemm = f32[4,2]{1,0} custom-call(%x, %w), custom_call_target="__cublas$gemm"
  ROOT %total = f32[] all-reduce(%i), channel_id=4, to_apply=%add
}
"""


def test_parse_module_reads_instructions_types_and_calls():
    computations, instrs = hlo.parse_module(TEXT)
    assert set(computations) == {"add", "fused_dot", "fused_slice", "body", "cond", "main"}
    assert [i.name for i in computations["fused_dot"]] == ["p0", "p1", "d"]
    d = instrs["d"]
    assert (d.opcode, d.operands) == ("dot", ["p0", "p1"])
    assert d.attr_ints("lhs_contracting_dims") == [1]
    assert instrs["loop"].called == ["body", "cond"]
    assert instrs["gemm"].custom_call_target == "__cublas$gemm"
    assert hlo.shapes(instrs["init"].type_text) == [("f32", (4, 8)), ("f32", (8, 2))]
    assert hlo.nbytes(instrs["init"].type_text) == 4 * (32 + 16)
    assert hlo.entry_name(TEXT) == "main"


def test_collective_counts():
    counts = hlo.collective_counts(TEXT)
    # the async all-reduce once, the ROOT one too; the permute's -start once, its -done not
    assert counts == {"all-gather": 1, "reduce-scatter": 0, "all-reduce": 2, "all-to-all": 0,
                      "collective-permute": 1, "all-reduce+slice": 1}


def test_op_sequence_and_loop_bodies():
    assert hlo.loop_bodies(TEXT) == ["body"]
    # matmuls (a dot, a dot fusion, a GEMM call) read "dot"; bookkeeping and -done left out
    assert hlo.op_sequence(TEXT) == ["all-gather", "dot", "all-reduce", "fusion", "while", "dot",
                                     "all-reduce"]
    assert hlo.op_sequence(TEXT, "body") == ["collective-permute", "dot", "dot"]
    with pytest.raises(KeyError, match="no computation 'nope'"):
        hlo.op_sequence(TEXT, "nope")
