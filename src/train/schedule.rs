//! Learning rate per step: linear warm-up from 0, then cosine decay to 0 at the last step.
//! A pure function of the step, so a resumed run continues the same curve.

pub fn learning_rate(step: u64, peak: f64, warmup_steps: u64, total_steps: u64) -> f64 {
    if step < warmup_steps {
        return peak * (step + 1) as f64 / warmup_steps as f64;
    }
    let decay_steps = total_steps.saturating_sub(warmup_steps).max(1);
    let progress = ((step - warmup_steps) as f64 / decay_steps as f64).min(1.0);
    peak * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

#[cfg(test)]
mod tests {
    use super::learning_rate;

    #[test]
    fn warms_up_linearly_then_decays_to_zero() {
        assert!((learning_rate(0, 1.0, 10, 100) - 0.1).abs() < 1e-12);
        assert!((learning_rate(9, 1.0, 10, 100) - 1.0).abs() < 1e-12);
        assert!((learning_rate(10, 1.0, 10, 100) - 1.0).abs() < 1e-12);
        assert!((learning_rate(55, 1.0, 10, 100) - 0.5).abs() < 1e-12);
        assert!(learning_rate(100, 1.0, 10, 100).abs() < 1e-12);
        let rates: Vec<f64> = (10..100).map(|s| learning_rate(s, 1.0, 10, 100)).collect();
        assert!(
            rates.windows(2).all(|w| w[1] <= w[0]),
            "monotone after warm-up"
        );
    }
}
