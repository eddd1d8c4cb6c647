//! The normalization kernels, launched as `vitdet_runtime::cuda::norm::run` launches them, on
//! f32 host buffers. Each function takes and returns what the runtime's CPU kernel of the op
//! does (`vitdet_runtime::kernels::norm`).

use candle_core::Tensor;
use vitdet_ir::ops::{
    BatchNorm, BatchNormTrain, BatchNormTrainGrad, GroupNorm, GroupNormGrad, LayerNorm, LayerNormGrad,
};
use vitdet_runtime::cuda::norm::NormGeom;
use vitdet_runtime::cuda::Launch;

use crate::{host, tensor, Result};

mod ffi {
    use super::{Launch, NormGeom};
    extern "C" {
        pub fn emu_norm_segments_fwd_f32(
            l: Launch,
            x: *const f32,
            w: *const f32,
            b: *const f32,
            y: *mut f32,
            g: NormGeom,
        );
        pub fn emu_norm_positions_fwd_f32(
            l: Launch,
            x: *const f32,
            w: *const f32,
            b: *const f32,
            y: *mut f32,
            g: NormGeom,
        );
        pub fn emu_norm_segments_bwd_f32(
            l: Launch,
            x: *const f32,
            w: *const f32,
            dy: *const f32,
            dx: *mut f32,
            mean: *mut f32,
            rstd: *mut f32,
            g: NormGeom,
        );
        pub fn emu_norm_positions_bwd_f32(
            l: Launch,
            x: *const f32,
            w: *const f32,
            dy: *const f32,
            dx: *mut f32,
            mean: *mut f32,
            rstd: *mut f32,
            g: NormGeom,
        );
        pub fn emu_norm_affine_grad_rows_f32(
            l: Launch,
            x: *const f32,
            dy: *const f32,
            mean: *const f32,
            rstd: *const f32,
            dw: *mut f32,
            db: *mut f32,
            g: NormGeom,
        );
        pub fn emu_norm_affine_grad_planes_f32(
            l: Launch,
            x: *const f32,
            dy: *const f32,
            mean: *const f32,
            rstd: *const f32,
            dw: *mut f32,
            db: *mut f32,
            g: NormGeom,
        );
        pub fn emu_norm_batch_fwd_f32(
            l: Launch,
            x: *const f32,
            w: *const f32,
            b: *const f32,
            rmean: *const f32,
            rvar: *const f32,
            y: *mut f32,
            g: NormGeom,
        );
        pub fn emu_norm_batch_train_fwd_f32(
            l: Launch,
            x: *const f32,
            w: *const f32,
            b: *const f32,
            rmean: *const f32,
            rvar: *const f32,
            y: *mut f32,
            new_rmean: *mut f32,
            new_rvar: *mut f32,
            g: NormGeom,
        );
        pub fn emu_norm_batch_train_bwd_f32(
            l: Launch,
            x: *const f32,
            w: *const f32,
            dy: *const f32,
            dx: *mut f32,
            dw: *mut f32,
            db: *mut f32,
            g: NormGeom,
        );
    }
}

/// Host copies of the operands (checked to be f32 by [`host`]).
fn hosts(operands: &[&Tensor]) -> Result<Vec<Vec<f32>>> {
    operands.iter().map(|t| host(t)).collect()
}

/// The entry points that share a signature, as function pointers (the CUDA path picks one of
/// each pair by the geometry, as these wrappers do).
type AffineFwd = unsafe extern "C" fn(Launch, *const f32, *const f32, *const f32, *mut f32, NormGeom);
type AffineBwd =
    unsafe extern "C" fn(Launch, *const f32, *const f32, *const f32, *mut f32, *mut f32, *mut f32, NormGeom);
type AffineSums =
    unsafe extern "C" fn(Launch, *const f32, *const f32, *const f32, *const f32, *mut f32, *mut f32, NormGeom);

/// `y` of layer norm and group norm: positions or segments, as the CUDA path picks.
fn affine_fwd(g: NormGeom, x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    let v = hosts(&[x, w, b])?;
    let mut y = vec![0.0; g.elems()];
    let (kernel, launch): (AffineFwd, Launch) = if g.by_position() {
        (ffi::emu_norm_positions_fwd_f32, g.positions_launch())
    } else {
        (ffi::emu_norm_segments_fwd_f32, g.segments_launch())
    };
    unsafe { kernel(launch, v[0].as_ptr(), v[1].as_ptr(), v[2].as_ptr(), y.as_mut_ptr(), g) };
    tensor(y, x.dims())
}

/// `(dx, dweight, dbias)` of layer and group norm: the `*_bwd` kernel, then the affine sums.
fn affine_bwd(g: NormGeom, x: &Tensor, w: &Tensor, dy: &Tensor) -> Result<Vec<Tensor>> {
    let v = hosts(&[x, w, dy])?;
    let (xp, wp, dyp) = (v[0].as_ptr(), v[1].as_ptr(), v[2].as_ptr());
    let c = g.c as usize;
    let mut dx = vec![0.0; g.elems()];
    let (mut mean, mut rstd) = (vec![0.0; g.stats_len()], vec![0.0; g.stats_len()]);
    let (mut dw, mut db) = (vec![0.0; c], vec![0.0; c]);
    let (bwd, bwd_launch): (AffineBwd, Launch) = if g.by_position() {
        (ffi::emu_norm_positions_bwd_f32, g.positions_launch())
    } else {
        (ffi::emu_norm_segments_bwd_f32, g.segments_launch())
    };
    let (sums, sums_launch): (AffineSums, Launch) = if g.affine_grad_by_rows() {
        (ffi::emu_norm_affine_grad_rows_f32, g.affine_grad_rows_launch())
    } else {
        (ffi::emu_norm_affine_grad_planes_f32, g.affine_grad_planes_launch())
    };
    unsafe {
        bwd(
            bwd_launch,
            xp,
            wp,
            dyp,
            dx.as_mut_ptr(),
            mean.as_mut_ptr(),
            rstd.as_mut_ptr(),
            g,
        );
        sums(
            sums_launch,
            xp,
            dyp,
            mean.as_ptr(),
            rstd.as_ptr(),
            dw.as_mut_ptr(),
            db.as_mut_ptr(),
            g,
        );
    }
    Ok(vec![tensor(dx, x.dims())?, tensor(dw, &[c])?, tensor(db, &[c])?])
}

pub fn layer_norm(op: &LayerNorm, x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    affine_fwd(NormGeom::layer(x.dims(), op.axis, op.eps)?, x, w, b)
}

pub fn layer_norm_grad(op: &LayerNormGrad, x: &Tensor, w: &Tensor, dy: &Tensor) -> Result<Vec<Tensor>> {
    affine_bwd(NormGeom::layer(x.dims(), op.axis, op.eps)?, x, w, dy)
}

pub fn group_norm(op: &GroupNorm, x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    affine_fwd(NormGeom::group(x.dims(), op.groups, op.eps)?, x, w, b)
}

pub fn group_norm_grad(op: &GroupNormGrad, x: &Tensor, w: &Tensor, dy: &Tensor) -> Result<Vec<Tensor>> {
    affine_bwd(NormGeom::group(x.dims(), op.groups, op.eps)?, x, w, dy)
}

pub fn batch_norm(op: &BatchNorm, x: &Tensor, w: &Tensor, b: &Tensor, mean: &Tensor, var: &Tensor) -> Result<Tensor> {
    let g = NormGeom::batch(x.dims(), op.eps, 0.0)?;
    let v = hosts(&[x, w, b, mean, var])?;
    let mut y = vec![0.0; g.elems()];
    unsafe {
        ffi::emu_norm_batch_fwd_f32(
            g.elements_launch(),
            v[0].as_ptr(),
            v[1].as_ptr(),
            v[2].as_ptr(),
            v[3].as_ptr(),
            v[4].as_ptr(),
            y.as_mut_ptr(),
            g,
        )
    };
    tensor(y, x.dims())
}

pub fn batch_norm_train(
    op: &BatchNormTrain,
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    rm: &Tensor,
    rv: &Tensor,
) -> Result<Vec<Tensor>> {
    let g = NormGeom::batch(x.dims(), op.eps, op.momentum)?;
    if g.per_channel() < 2 {
        return Err(format!(
            "batch_norm_train needs more than 1 value per channel, input is {:?}",
            x.dims()
        ));
    }
    let v = hosts(&[x, w, b, rm, rv])?;
    let c = g.c as usize;
    let mut y = vec![0.0; g.elems()];
    let (mut new_mean, mut new_var) = (vec![0.0; c], vec![0.0; c]);
    unsafe {
        ffi::emu_norm_batch_train_fwd_f32(
            g.channels_launch(),
            v[0].as_ptr(),
            v[1].as_ptr(),
            v[2].as_ptr(),
            v[3].as_ptr(),
            v[4].as_ptr(),
            y.as_mut_ptr(),
            new_mean.as_mut_ptr(),
            new_var.as_mut_ptr(),
            g,
        )
    };
    Ok(vec![
        tensor(y, x.dims())?,
        tensor(new_mean, &[c])?,
        tensor(new_var, &[c])?,
    ])
}

pub fn batch_norm_train_grad(op: &BatchNormTrainGrad, x: &Tensor, w: &Tensor, dy: &Tensor) -> Result<Vec<Tensor>> {
    let g = NormGeom::batch(x.dims(), op.eps, 0.0)?;
    let v = hosts(&[x, w, dy])?;
    let c = g.c as usize;
    let mut dx = vec![0.0; g.elems()];
    let (mut dw, mut db) = (vec![0.0; c], vec![0.0; c]);
    unsafe {
        ffi::emu_norm_batch_train_bwd_f32(
            g.channels_launch(),
            v[0].as_ptr(),
            v[1].as_ptr(),
            v[2].as_ptr(),
            dx.as_mut_ptr(),
            dw.as_mut_ptr(),
            db.as_mut_ptr(),
            g,
        )
    };
    Ok(vec![tensor(dx, x.dims())?, tensor(dw, &[c])?, tensor(db, &[c])?])
}
