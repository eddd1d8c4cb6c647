//! Dynamic loss scaling for float16 training, with `torch.cuda.amp.GradScaler`'s semantics.
//!
//! The loss gradient is multiplied by `scale` before the backward (the training graph takes it
//! as its loss seed), so small float16 gradients do not flush to zero. Before the optimizer
//! step the parameter gradients (f32) are unscaled, `g * (1 / scale)`, and checked: when any
//! scaled gradient holds an inf or NaN the step is skipped. Then the scale is updated as
//! `torch._amp_update_scale_` does:
//!
//! * an overflow multiplies the scale by `backoff_factor` and resets the growth tracker;
//! * otherwise the tracker counts the step, and on reaching `growth_interval` consecutive good
//!   steps the scale is multiplied by `growth_factor` (unless that overflows f32) and the
//!   tracker resets.
//!
//! Defaults are PyTorch's: scale 2^16, growth factor 2, backoff 0.5, growth interval 2000. The
//! scale is an f32 (as torch keeps it in a float tensor); the growth and backoff products are
//! formed in f64 and rounded to f32, and `1 / scale` is computed in f64 and rounded to f32, as
//! torch does. [`GradScalerState`] serializes with the keys of torch's `state_dict()`.

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::OptimError;

/// The scaler's fixed settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GradScalerConfig {
    pub init_scale: f32,
    pub growth_factor: f64,
    pub backoff_factor: f64,
    /// Consecutive steps without inf/NaN gradients before the scale grows.
    pub growth_interval: u32,
}

impl Default for GradScalerConfig {
    /// PyTorch's defaults (detectron2's AMPTrainer uses them).
    fn default() -> Self {
        GradScalerConfig {
            init_scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
        }
    }
}

/// Everything a resumed run needs, with the keys of torch's `GradScaler.state_dict()`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GradScalerState {
    pub scale: f32,
    pub growth_factor: f64,
    pub backoff_factor: f64,
    pub growth_interval: u32,
    #[serde(rename = "_growth_tracker")]
    pub growth_tracker: u32,
}

/// Gradients divided by the scale, and whether any scaled gradient was inf or NaN.
#[derive(Debug, Clone)]
pub struct Unscaled {
    pub gradients: Vec<(String, Tensor)>,
    pub found_inf: bool,
}

/// What [`GradScaler::step`] did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScaledStep {
    /// The scale the step's gradients were computed with.
    pub scale: f32,
    /// Whether the optimizer step was skipped for inf/NaN gradients.
    pub skipped: bool,
}

/// torch's `GradScaler` (see the module doc).
#[derive(Debug, Clone, PartialEq)]
pub struct GradScaler {
    scale: f32,
    growth_factor: f64,
    backoff_factor: f64,
    growth_interval: u32,
    growth_tracker: u32,
}

impl GradScaler {
    pub fn new(config: GradScalerConfig) -> Result<Self, OptimError> {
        Self::from_state(GradScalerState {
            scale: config.init_scale,
            growth_factor: config.growth_factor,
            backoff_factor: config.backoff_factor,
            growth_interval: config.growth_interval,
            growth_tracker: 0,
        })
    }

    /// Restores a scaler from [`GradScaler::state`], checking the ranges torch asserts
    /// (`growth_factor > 1`, `backoff_factor < 1`) and that the scale is a positive f32.
    pub fn from_state(state: GradScalerState) -> Result<Self, OptimError> {
        let bad = |m: String| Err(OptimError::Config(format!("GradScaler {m}")));
        if !(state.scale.is_finite() && state.scale > 0.0) {
            return bad(format!("scale must be finite and > 0, found {}", state.scale));
        }
        if !(state.growth_factor.is_finite() && state.growth_factor > 1.0) {
            return bad(format!("growth_factor must be > 1, found {}", state.growth_factor));
        }
        if !(state.backoff_factor > 0.0 && state.backoff_factor < 1.0) {
            return bad(format!(
                "backoff_factor must be in (0, 1), found {}",
                state.backoff_factor
            ));
        }
        if state.growth_interval == 0 {
            return bad("growth_interval must be at least 1".to_string());
        }
        if state.growth_tracker >= state.growth_interval {
            return bad(format!(
                "growth tracker {} must be below the growth interval {}",
                state.growth_tracker, state.growth_interval
            ));
        }
        Ok(GradScaler {
            scale: state.scale,
            growth_factor: state.growth_factor,
            backoff_factor: state.backoff_factor,
            growth_interval: state.growth_interval,
            growth_tracker: state.growth_tracker,
        })
    }

    pub fn state(&self) -> GradScalerState {
        GradScalerState {
            scale: self.scale,
            growth_factor: self.growth_factor,
            backoff_factor: self.backoff_factor,
            growth_interval: self.growth_interval,
            growth_tracker: self.growth_tracker,
        }
    }

    /// The current scale: the value of the training graph's loss-scale input.
    pub fn scale(&self) -> f32 {
        self.scale
    }

    /// Consecutive good steps since the scale last changed.
    pub fn growth_tracker(&self) -> u32 {
        self.growth_tracker
    }

    /// `1 / scale`, computed in f64 and rounded to f32 (torch: `scale.double().reciprocal().float()`).
    pub fn inv_scale(&self) -> f32 {
        (1.0 / self.scale as f64) as f32
    }

    /// torch's `unscale_`: each f32 gradient times [`GradScaler::inv_scale`] in f32, and whether
    /// any *scaled* gradient holds an inf or NaN. The check is one reduction per tensor summed
    /// on the gradients' device, read back once.
    pub fn unscale(&self, gradients: &[(String, Tensor)]) -> Result<Unscaled, OptimError> {
        let inv = self.inv_scale() as f64;
        let mut nan_sum: Option<Tensor> = None;
        let mut out = Vec::with_capacity(gradients.len());
        for (name, g) in gradients {
            let fail = |source: candle_core::Error| OptimError::Update {
                name: name.clone(),
                source,
            };
            if g.dtype() != DType::F32 {
                // As torch refuses to unscale float16 gradients: the parameters are f32 masters.
                return Err(fail(candle_core::Error::Msg(format!(
                    "GradScaler unscales f32 gradients, found {:?}",
                    g.dtype()
                ))));
            }
            // `g - g` is 0 where g is finite and NaN where it is NaN or +-inf; sums of zeros
            // stay exactly 0, and one NaN makes the total NaN.
            let s = g.sub(g).and_then(|d| d.sum_all()).map_err(fail)?;
            nan_sum = Some(match nan_sum {
                None => s,
                Some(acc) => (acc + s).map_err(fail)?,
            });
            out.push((name.clone(), g.affine(inv, 0.0).map_err(fail)?));
        }
        let found_inf = match nan_sum {
            None => false,
            Some(s) => !s.to_scalar::<f32>()?.is_finite(),
        };
        Ok(Unscaled {
            gradients: out,
            found_inf,
        })
    }

    /// torch's `update()` after a step whose scaled gradients did (`found_inf`) or did not hold
    /// an inf or NaN.
    pub fn update(&mut self, found_inf: bool) {
        if found_inf {
            self.scale = (self.scale as f64 * self.backoff_factor) as f32;
            self.growth_tracker = 0;
            return;
        }
        let successful = self.growth_tracker + 1;
        if successful == self.growth_interval {
            let grown = (self.scale as f64 * self.growth_factor) as f32;
            // torch does not grow the scale past f32's range to inf.
            if grown.is_finite() {
                self.scale = grown;
            }
            self.growth_tracker = 0;
        } else {
            self.growth_tracker = successful;
        }
    }

    /// torch's `scaler.step(optimizer); scaler.update()` for gradients computed with the current
    /// scale: unscales them, runs `apply` (the optimizer step) on the unscaled gradients unless
    /// an inf or NaN was found, then updates the scale.
    pub fn step<E: From<OptimError>>(
        &mut self,
        gradients: &[(String, Tensor)],
        apply: impl FnOnce(&[(String, Tensor)]) -> Result<(), E>,
    ) -> Result<ScaledStep, E> {
        let scale = self.scale;
        let unscaled = self.unscale(gradients)?;
        if !unscaled.found_inf {
            apply(&unscaled.gradients)?;
        }
        self.update(unscaled.found_inf);
        Ok(ScaledStep {
            scale,
            skipped: unscaled.found_inf,
        })
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::optim::{AdamW, AdamWConfig};
    use crate::ParamStore;

    fn scaler(interval: u32) -> GradScaler {
        GradScaler::new(GradScalerConfig {
            growth_interval: interval,
            ..GradScalerConfig::default()
        })
        .unwrap()
    }

    fn grad(values: &[f32]) -> Tensor {
        Tensor::new(values, &Device::Cpu).unwrap()
    }

    /// torch: `GradScaler()` starts at 65536; `update()` after an overflow halves the scale and
    /// resets the tracker; `growth_interval` clean steps double it.
    #[test]
    fn backoff_on_inf_and_growth_after_the_interval() {
        let mut s = GradScaler::new(GradScalerConfig::default()).unwrap();
        assert_eq!((s.scale(), s.growth_tracker()), (65536.0, 0));
        s.update(true);
        assert_eq!((s.scale(), s.growth_tracker()), (32768.0, 0));
        for i in 1..2000 {
            s.update(false);
            assert_eq!((s.scale(), s.growth_tracker()), (32768.0, i));
        }
        s.update(false);
        assert_eq!((s.scale(), s.growth_tracker()), (65536.0, 0));

        // An overflow in the middle of an interval restarts the count.
        let mut s = scaler(3);
        s.update(false);
        s.update(false);
        assert_eq!(s.growth_tracker(), 2);
        s.update(true);
        assert_eq!((s.scale(), s.growth_tracker()), (32768.0, 0));
        s.update(false);
        s.update(false);
        assert_eq!(s.scale(), 32768.0);
        s.update(false);
        assert_eq!((s.scale(), s.growth_tracker()), (65536.0, 0));

        // Growth that would overflow f32 keeps the scale (torch's isfinite check) but still
        // resets the tracker.
        let mut s = GradScaler::from_state(GradScalerState {
            scale: 2f32.powi(127),
            growth_tracker: 0,
            ..scaler(1).state()
        })
        .unwrap();
        s.update(false);
        assert_eq!((s.scale(), s.growth_tracker()), (2f32.powi(127), 0));

        // A non-power-of-two backoff rounds the f64 product to f32: 65536 * 0.3 = 19660.8.
        let mut s = GradScaler::from_state(GradScalerState {
            backoff_factor: 0.3,
            ..scaler(5).state()
        })
        .unwrap();
        s.update(true);
        assert_eq!(s.scale(), 19660.8f32);
    }

    /// `unscale_` multiplies by the f32 reciprocal (1/3 rounds to 0.333333343) and flags inf or
    /// NaN found in the scaled gradients.
    #[test]
    fn unscale_multiplies_by_the_f32_reciprocal_and_finds_infs() {
        let s = GradScaler::from_state(GradScalerState {
            scale: 3.0,
            ..scaler(10).state()
        })
        .unwrap();
        assert_eq!(s.inv_scale(), 0.333_333_34f32);
        let grads = vec![
            ("a".to_string(), grad(&[3.0, -6.0, 1.0, 0.0])),
            ("b".to_string(), grad(&[7.5])),
        ];
        let u = s.unscale(&grads).unwrap();
        assert!(!u.found_inf);
        let a = u.gradients[0].1.to_vec1::<f32>().unwrap();
        let inv = 0.333_333_34f32;
        assert_eq!(a, vec![3.0 * inv, -6.0 * inv, inv, 0.0]);
        assert_eq!(u.gradients[1].1.to_vec1::<f32>().unwrap(), vec![7.5 * inv]);
        for bad in [f32::INFINITY, f32::NEG_INFINITY, f32::NAN] {
            let grads = vec![
                ("a".to_string(), grad(&[1.0, 2.0])),
                ("b".to_string(), grad(&[0.5, bad, 1.0])),
            ];
            assert!(s.unscale(&grads).unwrap().found_inf, "{bad}");
        }
        let f16 = vec![("h".to_string(), grad(&[1.0]).to_dtype(DType::F16).unwrap())];
        let err = s.unscale(&f16).unwrap_err().to_string();
        assert!(err.contains("`h`") && err.contains("f32"), "{err}");
    }

    /// An overflowing step leaves parameters and AdamW state untouched and halves the scale; a
    /// clean one steps with the unscaled gradient (AdamW's first step moves each element by
    /// -lr * sign(g), so the unscaling is visible through a zero gradient staying put).
    #[test]
    fn skipped_step_leaves_the_optimizer_alone() {
        let mut s = GradScaler::new(GradScalerConfig::default()).unwrap();
        let mut params = ParamStore::from_tensors([("w".to_string(), grad(&[1.0, 2.0]))]);
        let mut opt = AdamW::new(AdamWConfig::default()).unwrap();
        let lr = 0.1;
        let overflow = vec![("w".to_string(), grad(&[f32::INFINITY, 65536.0]))];
        let out = s
            .step(&overflow, |g| opt.step(&mut params, g, |_| Some((lr, 0.0))))
            .unwrap();
        assert_eq!(
            out,
            ScaledStep {
                scale: 65536.0,
                skipped: true
            }
        );
        assert_eq!(s.scale(), 32768.0);
        assert!(opt.states().next().is_none(), "no AdamW state after a skipped step");
        assert_eq!(params.get("w").unwrap().to_vec1::<f32>().unwrap(), vec![1.0, 2.0]);

        // Scaled by 32768: the unscaled gradient is [1, -0.5]: the first AdamW step moves each
        // element by lr against its sign (m_hat / sqrt(v_hat) = sign(g), eps negligible).
        let good = vec![("w".to_string(), grad(&[32768.0, -16384.0]))];
        let out = s
            .step(&good, |g| {
                assert_eq!(g[0].1.to_vec1::<f32>().unwrap(), vec![1.0, -0.5]);
                opt.step(&mut params, g, |_| Some((lr, 0.0)))
            })
            .unwrap();
        assert!(!out.skipped);
        assert_eq!((s.scale(), s.growth_tracker()), (32768.0, 1));
        let w = params.get("w").unwrap().to_vec1::<f32>().unwrap();
        assert!((w[0] - 0.9).abs() < 1e-6 && (w[1] - 2.1).abs() < 1e-6, "{w:?}");
    }

    #[test]
    fn state_round_trips_with_torch_keys_and_is_checked() {
        let mut s = scaler(4);
        s.update(false);
        s.update(true);
        s.update(false);
        let json = serde_json::to_value(s.state()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"scale": 32768.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                               "growth_interval": 4, "_growth_tracker": 1})
        );
        let back: GradScalerState = serde_json::from_value(json).unwrap();
        assert_eq!(GradScaler::from_state(back).unwrap(), s);
        for bad in [
            GradScalerState {
                scale: 0.0,
                ..s.state()
            },
            GradScalerState {
                growth_factor: 1.0,
                ..s.state()
            },
            GradScalerState {
                backoff_factor: 1.0,
                ..s.state()
            },
            GradScalerState {
                growth_tracker: 4,
                ..s.state()
            },
        ] {
            let err = GradScaler::from_state(bad).unwrap_err().to_string();
            assert!(err.contains("GradScaler"), "{err}");
        }
    }
}
