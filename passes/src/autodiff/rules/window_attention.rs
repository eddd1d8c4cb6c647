//! Fused windowed attention: one `window_attention_grad` node recomputes the probabilities
//! from `q`, `k` and the saved row log-sum-exp and returns every input gradient at once.

use vitdet_ir::ops::WindowAttention;
use vitdet_ir::Value;

use super::{Ctx, Grads};

/// Only `out` (output 0) is differentiable: `lse` is an auxiliary value the backward reads,
/// and a gradient reaching it means some consumer treats it as data, which the rule cannot
/// honour.
pub(super) fn window_attention(ctx: &mut Ctx, o: &WindowAttention, dys: &[Option<Value>]) -> Grads {
    if dys.get(1).is_some_and(Option::is_some) {
        return Err("a gradient reached `lse` (output 1), which is auxiliary and not differentiable".into());
    }
    let dout = dys
        .first()
        .copied()
        .flatten()
        .ok_or_else(|| "output 0 has no gradient".to_string())?;
    let n = ctx.num_inputs();
    if n != o.num_inputs() {
        return Err(format!("expects {} inputs for its attributes, has {n}", o.num_inputs()));
    }
    let mut inputs: Vec<Value> = (0..n).map(|i| ctx.input(i)).collect();
    inputs.extend([ctx.output(0), ctx.output(1), dout]);
    let grads = ctx.emit_multi(o.grad(), &inputs)?;
    Ok(grads
        .into_iter()
        .enumerate()
        .map(|(i, g)| ctx.needs(i).then_some(g))
        .collect())
}
