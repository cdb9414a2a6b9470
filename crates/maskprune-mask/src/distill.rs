//! The distillation and next-token losses on logits `[batch, len, vocab]`, as burn tensor
//! ops (the definitions; mask training computes them fused with the LM head through
//! [`maskprune_model::Llama::head_loss`]).

use burn::tensor::{backend::Backend, Tensor};
use maskprune_model::kernels::composed;

/// Mean over positions of KL(teacher || student) on logits `[batch, len, vocab]` softened by
/// `temperature`, multiplied by `temperature^2` (Hinton et al.) so gradients keep their scale.
/// The teacher's logits are detached.
pub fn distillation_kl<B: Backend>(
    student: Tensor<B, 3>,
    teacher: Tensor<B, 3>,
    temperature: f64,
) -> Tensor<B, 1> {
    let [b, t, v] = student.dims();
    composed::distillation_kl(
        student.reshape([b * t, v]),
        teacher.reshape([b * t, v]),
        temperature,
    )
}

/// Mean next-token cross-entropy of logits `[batch, len, vocab]` on the tokens themselves
/// (position `i` predicts token `i + 1`).
pub fn next_token_loss<B: Backend>(
    logits: Tensor<B, 3>,
    tokens: Tensor<B, 2, burn::tensor::Int>,
) -> Tensor<B, 1> {
    let [b, t, v] = logits.dims();
    let targets: Vec<u32> = tokens
        .narrow(1, 1, t - 1)
        .into_data()
        .convert::<i64>()
        .to_vec::<i64>()
        .expect("token ids")
        .into_iter()
        .map(|id| id as u32)
        .collect();
    composed::cross_entropy(
        logits.narrow(1, 0, t - 1).reshape([b * (t - 1), v]),
        &targets,
    )
}

/// The next-token target of every position of `rows` (`None` for each row's last position),
/// in the batch-major order of [`maskprune_model::Llama::head_loss`].
pub fn next_token_targets(rows: &[&[u32]]) -> Vec<Option<u32>> {
    rows.iter()
        .flat_map(|r| (0..r.len()).map(move |i| r.get(i + 1).copied()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, NdArray};
    use burn::tensor::{Distribution, TensorData};

    type AD = Autodiff<NdArray>;

    #[test]
    fn kl_is_zero_for_equal_logits_and_positive_otherwise() {
        let device = Default::default();
        let a = Tensor::<AD, 3>::random([2, 3, 7], Distribution::Normal(0.0, 2.0), &device);
        let zero: f32 = distillation_kl(a.clone(), a.clone(), 2.0).into_scalar();
        assert!(zero.abs() < 1e-6);
        let b = Tensor::<AD, 3>::random([2, 3, 7], Distribution::Normal(0.0, 2.0), &device);
        let kl: f32 = distillation_kl(b, a, 1.0).into_scalar();
        assert!(kl > 0.01);
    }

    #[test]
    fn kl_matches_a_hand_computed_value() {
        let device = Default::default();
        let s =
            Tensor::<NdArray, 3>::from_data(TensorData::new(vec![0.0f32, 0.0], [1, 1, 2]), &device);
        let t = Tensor::<NdArray, 3>::from_data(
            TensorData::new(vec![0.0f32, (3.0f32).ln()], [1, 1, 2]),
            &device,
        );
        // teacher p = (0.25, 0.75), student q = (0.5, 0.5): KL = 0.25 ln 0.5 + 0.75 ln 1.5
        let expected = 0.25 * (0.5f32).ln() + 0.75 * (1.5f32).ln();
        let kl: f32 = distillation_kl(s, t, 1.0).into_scalar();
        assert!((kl - expected).abs() < 1e-6, "{kl} vs {expected}");
    }

    #[test]
    fn next_token_loss_is_the_mean_cross_entropy() {
        let device = Default::default();
        // vocab 2, tokens [0, 1, 1]: positions 0 and 1 predict 1 and 1.
        let logits = Tensor::<NdArray, 3>::from_data(
            TensorData::new(vec![0.0f32, 0.0, 0.0, (3.0f32).ln(), 9.0, 9.0], [1, 3, 2]),
            &device,
        );
        let tokens = Tensor::<NdArray, 2, burn::tensor::Int>::from_data(
            TensorData::new(vec![0i64, 1, 1], [1, 3]),
            &device,
        );
        let expected = -((0.5f32).ln() + (0.75f32).ln()) / 2.0;
        let got: f32 = next_token_loss(logits, tokens).into_scalar();
        assert!((got - expected).abs() < 1e-6, "{got} vs {expected}");
    }

    #[test]
    fn gradient_pulls_the_student_toward_the_teacher() {
        let device = Default::default();
        let s = Tensor::<AD, 3>::from_data(TensorData::new(vec![0.0f32, 0.0], [1, 1, 2]), &device)
            .require_grad();
        let t = Tensor::<AD, 3>::from_data(TensorData::new(vec![0.0f32, 1.0], [1, 1, 2]), &device);
        let grads = distillation_kl(s.clone(), t, 1.0).backward();
        let g: Vec<f32> = s.grad(&grads).unwrap().into_data().to_vec().unwrap();
        assert!(g[1] < 0.0 && g[0] > 0.0, "{g:?}");
    }
}
