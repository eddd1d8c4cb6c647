//! Box decoding and clipping as tensor ops on the inputs' device, for devices and dtypes without
//! the CUDA box kernels (`crate::cuda::detection`; f64, or another GPU backend), where the host
//! loops would copy the inputs to the host and wait for the device between the detector's small
//! kernels. The same f64 arithmetic in the same order as the host loops (true divisions,
//! `torch.clamp`'s NaN handling), rounded to the output dtype once: on the CPU both give the
//! same bits (tested below).

use candle_core::{DType, Tensor, D};
use vitdet_ir::ops::{BoxDecode, ClipBoxes};

use crate::kernels::KernelResult;

/// An f64 scalar on `t`'s device, broadcast against it by the `broadcast_*` ops.
fn scalar(v: f64, t: &Tensor) -> candle_core::Result<Tensor> {
    Tensor::new(v, t.device())
}

/// `v` where it is not above `max`, else `max` (NaN stays NaN, as `torch.clamp(max=)`).
fn clamp_max(v: &Tensor, max: f64) -> candle_core::Result<Tensor> {
    let max_t = scalar(max, v)?.broadcast_as(v.shape())?;
    v.gt(max)?.where_cond(&max_t, v)
}

/// [`super::box_decode`] for `deltas [N, 4k]`, `boxes [N, 4]` (validated by the caller).
pub(super) fn box_decode(op: &BoxDecode, deltas: &Tensor, boxes: &Tensor) -> KernelResult<Tensor> {
    let (n, d4) = deltas.dims2()?;
    let d = deltas.to_dtype(DType::F64)?.reshape((n, d4 / 4, 4))?;
    let b = boxes.to_dtype(DType::F64)?;
    let delta = |i: usize| d.narrow(D::Minus1, i, 1)?.squeeze(D::Minus1); // [N, k]
    let corner = |i: usize| b.narrow(1, i, 1); // [N, 1]
    let half = |t: &Tensor| t.broadcast_mul(&scalar(0.5, t)?);
    let (x0, y0, x1, y1) = (corner(0)?, corner(1)?, corner(2)?, corner(3)?);
    let (w, h) = ((&x1 - &x0)?, (&y1 - &y0)?);
    let (cx, cy) = ((&x0 + half(&w)?)?, (&y0 + half(&h)?)?);
    let [wx, wy, ww, wh] = op.weights;
    let ratio = |i: usize, weight: f64| -> candle_core::Result<Tensor> {
        let t = delta(i)?;
        t.broadcast_div(&scalar(weight, &t)?)
    };
    let (dx, dy) = (ratio(0, wx)?, ratio(1, wy)?);
    let (dw, dh) = (
        clamp_max(&ratio(2, ww)?, op.scale_clamp)?,
        clamp_max(&ratio(3, wh)?, op.scale_clamp)?,
    );
    let pcx = dx.broadcast_mul(&w)?.broadcast_add(&cx)?;
    let pcy = dy.broadcast_mul(&h)?.broadcast_add(&cy)?;
    let pw = dw.exp()?.broadcast_mul(&w)?;
    let ph = dh.exp()?.broadcast_mul(&h)?;
    let (hw, hh) = (half(&pw)?, half(&ph)?);
    let out = Tensor::stack(&[(&pcx - &hw)?, (&pcy - &hh)?, (&pcx + &hw)?, (&pcy + &hh)?], 2)?;
    Ok(out.reshape((n, d4))?.to_dtype(deltas.dtype())?)
}

/// [`super::clip_boxes`] for `boxes [..., 4]` (validated by the caller).
pub(super) fn clip_boxes(op: &ClipBoxes, boxes: &Tensor) -> KernelResult<Tensor> {
    let b = boxes.to_dtype(DType::F64)?;
    let bounds = Tensor::new(&[op.width, op.height, op.width, op.height], boxes.device())?;
    let hi = bounds.broadcast_as(b.shape())?;
    let zero = b.zeros_like()?;
    // Comparisons with NaN are false: NaN stays NaN, as `torch.clamp`.
    let low = b.lt(0.0)?.where_cond(&zero, &b)?;
    let clipped = low.gt(&hi)?.where_cond(&hi, &low)?;
    Ok(clipped.to_dtype(boxes.dtype())?)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    /// Boxes and deltas with the cases the arithmetic must agree on: clamped and NaN scales,
    /// inverted and degenerate boxes, coordinates past the image.
    fn inputs(dtype: DType) -> (Tensor, Tensor) {
        let mut boxes = Vec::new();
        let mut deltas = Vec::new();
        for i in 0..40 {
            let f = i as f64;
            let (x0, y0) = (f * 13.7 - 50.0, f * 7.3 - 20.0);
            let (w, h) = if i % 7 == 3 {
                (-5.0, 0.0)
            } else {
                (8.0 + f * 3.1, 4.0 + f * 1.9)
            };
            boxes.extend([x0, y0, x0 + w, y0 + h]);
            for g in 0..3 {
                let s = (f + g as f64) * 0.37;
                let big = if (i + g) % 5 == 0 { 40.0 } else { 0.0 };
                let nan = if (i + g) % 11 == 4 { f64::NAN } else { 0.0 };
                deltas.extend([s.sin() * 2.0, s.cos() * 2.0, s.sin() + big + nan, s.cos() - big]);
            }
        }
        let t = |v: Vec<f64>, c: usize| {
            Tensor::from_vec(v, (40, c), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
        };
        (t(deltas, 12), t(boxes, 4))
    }

    fn bits(t: &Tensor) -> Vec<u64> {
        let v = crate::kernels::f64_values(t);
        v.iter()
            .map(|v| if v.is_nan() { u64::MAX } else { v.to_bits() })
            .collect()
    }

    #[test]
    fn device_ops_give_the_host_loops_bits() {
        let decode = BoxDecode {
            weights: [10.0, 10.0, 5.0, 5.0],
            scale_clamp: (1000.0f64 / 16.0).ln(),
        };
        let clip = ClipBoxes {
            width: 333.0,
            height: 200.0,
        };
        for dtype in [DType::F32, DType::F64, DType::BF16] {
            let (deltas, boxes) = inputs(dtype);
            let host = super::super::box_decode(&decode, &deltas, &boxes).unwrap();
            let ours = box_decode(&decode, &deltas, &boxes).unwrap();
            assert_eq!((ours.dims(), ours.dtype()), (host.dims(), host.dtype()));
            assert_eq!(bits(&ours), bits(&host), "box_decode {dtype:?}");
            assert!(bits(&host).contains(&u64::MAX), "the inputs exercise NaN");

            let (host, ours) = (host.reshape((120, 4)).unwrap(), ours.reshape((120, 4)).unwrap());
            let host = super::super::clip_boxes(&clip, &host).unwrap();
            let ours = clip_boxes(&clip, &ours).unwrap();
            assert_eq!(bits(&ours), bits(&host), "clip_boxes {dtype:?}");
        }
    }
}
