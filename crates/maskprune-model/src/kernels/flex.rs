//! burn-flex runs the decoder's operations with the one-pass CPU kernels of
//! [`crate::cpu_kernels`], reading its tensors' storage in place.

use burn::backend::Flex;
use burn::tensor::{bf16, f16, DType, Tensor, TensorData, TensorPrimitive};
use burn_flex::FlexTensor;

use super::{HeadLoss, HeadTerms, Kernels};
use crate::cpu_kernels::{self, attention, gemm, head, pointwise};
use crate::rope::Rotary;

/// A burn-flex tensor's f32 values, borrowed from its storage when they are laid out
/// contiguously from its start (activations always are, even while other tensors share the
/// storage, as the residual stream does); a contiguous copy otherwise.
pub(super) struct Values(FlexTensor);

impl Values {
    /// Weights kept in bf16/f16 (their checkpoint's dtype) are widened to f32 here, one
    /// operation at a time: the values are those a load in f32 would have given.
    pub(super) fn new(t: FlexTensor) -> Self {
        if is_plain_f32(&t) {
            return Values(t);
        }
        let t = t.to_contiguous();
        let range = {
            let start = t.layout().start_offset();
            start..start + t.layout().num_elements()
        };
        let widened: Vec<f32> = match t.dtype() {
            DType::BF16 => t.storage::<bf16>()[range]
                .iter()
                .map(|v| v.to_f32())
                .collect(),
            DType::F16 => t.storage::<f16>()[range]
                .iter()
                .map(|v| v.to_f32())
                .collect(),
            _ => {
                assert!(
                    is_plain_f32(&t),
                    "f32 tensors expected (got {:?})",
                    t.dtype()
                );
                return Values(t);
            }
        };
        let shape = t.layout().shape().clone();
        Values(FlexTensor::from_data(TensorData::new(widened, shape)))
    }

    pub(super) fn of<const D: usize>(x: Tensor<Flex, D>) -> Self {
        Self::new(primitive(x))
    }

    pub(super) fn slice(&self) -> &[f32] {
        &self.0.storage::<f32>()[..self.0.layout().num_elements()]
    }
}

/// Whether `t` is f32 values laid out contiguously from the start of its storage.
fn is_plain_f32(t: &FlexTensor) -> bool {
    t.layout().is_contiguous()
        && t.layout().start_offset() == 0
        && t.dtype() == burn::tensor::DType::F32
}

/// The burn-flex tensor inside `x` (no copy).
pub(super) fn primitive<const D: usize>(x: Tensor<Flex, D>) -> FlexTensor {
    x.into_primitive().tensor()
}

/// `t` as a tensor (no copy).
pub(super) fn wrap<const D: usize>(t: FlexTensor) -> Tensor<Flex, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// A new tensor of `values` (the vector becomes its storage).
pub(super) fn new_tensor<const D: usize>(values: Vec<f32>, shape: [usize; D]) -> Tensor<Flex, D> {
    Tensor::from_data(TensorData::new(values, shape), &Default::default())
}

/// `[rows, cols]` of a weight, and its values.
fn weight_values(w: &Tensor<Flex, 2>) -> ([usize; 2], Values) {
    (w.dims(), Values::of(w.clone()))
}

impl Kernels for Flex {
    fn keeps_stored_dtype() -> bool {
        true
    }

    fn run<R: Send>(f: impl FnOnce() -> R + Send) -> R {
        cpu_kernels::on_pool(f)
    }

    fn frozen_linear(x: Tensor<Flex, 3>, weight: &Tensor<Flex, 2>) -> Tensor<Flex, 3> {
        let [b, t, k] = x.dims();
        let ([w_in, n], w) = weight_values(weight);
        assert_eq!(w_in, k, "weight shape");
        let x = Values::of(x);
        new_tensor(gemm::matmul(x.slice(), w.slice(), [b * t, n, k]), [b, t, n])
    }

    /// The product is accumulated into the residual's buffer (reused when no other tensor
    /// shares it): the residual connection costs no pass of its own.
    fn frozen_linear_add(
        residual: Tensor<Flex, 3>,
        x: Tensor<Flex, 3>,
        weight: &Tensor<Flex, 2>,
    ) -> Tensor<Flex, 3> {
        let [b, t, k] = x.dims();
        let ([w_in, n], w) = weight_values(weight);
        assert!(
            w_in == k && residual.dims() == [b, t, n],
            "linear_add shapes"
        );
        let mut sum = Values::of(residual).0;
        let x = Values::of(x);
        let dst = &mut sum.storage_mut::<f32>()[..b * t * n];
        gemm::matmul_add(dst, x.slice(), w.slice(), [b * t, n, k]);
        wrap(sum)
    }

    fn swiglu_projections(
        x: Tensor<Flex, 3>,
        gate: &Tensor<Flex, 2>,
        up: &Tensor<Flex, 2>,
    ) -> Tensor<Flex, 3> {
        let [b, t, k] = x.dims();
        let ([w_in, n], g) = weight_values(gate);
        assert!(w_in == k && up.dims() == [k, n], "weight shapes");
        let (x, u) = (Values::of(x), Values::of(up.clone()));
        let out = gemm::swiglu_projections(x.slice(), g.slice(), u.slice(), [b * t, n, k]);
        new_tensor(out, [b, t, n])
    }

    fn swiglu(gate: Tensor<Flex, 3>, up: Tensor<Flex, 3>) -> Tensor<Flex, 3> {
        let shape = gate.dims();
        let (g, u) = (Values::of(gate), Values::of(up));
        new_tensor(pointwise::swiglu(g.slice(), u.slice()), shape)
    }

    fn scale_groups<const D: usize>(
        x: Tensor<Flex, D>,
        m: Tensor<Flex, 1>,
        group: usize,
    ) -> Tensor<Flex, D> {
        let shape = x.dims();
        let (x, m) = (Values::of(x), Values::of(m));
        new_tensor(pointwise::scale_groups(x.slice(), m.slice(), group), shape)
    }

    fn rms_norm(x: Tensor<Flex, 3>, weight: &Tensor<Flex, 1>, eps: f64) -> Tensor<Flex, 3> {
        let shape = x.dims();
        let (x, w) = (Values::of(x), Values::of(weight.clone()));
        new_tensor(pointwise::rms_norm(x.slice(), w.slice(), eps), shape)
    }

    fn rotary(x: Tensor<Flex, 4>, tables: &Rotary<Flex>) -> Tensor<Flex, 4> {
        let shape = x.dims();
        let (cos, sin) = tables.host();
        let x = Values::of(x);
        new_tensor(pointwise::rotary(x.slice(), cos, sin, shape), shape)
    }

    fn causal_attention(
        q: Tensor<Flex, 4>,
        k: Tensor<Flex, 4>,
        v: Tensor<Flex, 4>,
    ) -> Tensor<Flex, 4> {
        let shape = q.dims();
        let dims = attention_dims(shape, k.dims());
        let (q, k, v) = (Values::of(q), Values::of(k), Values::of(v));
        let out = attention::forward(q.slice(), k.slice(), v.slice(), &dims, None);
        new_tensor(out, shape)
    }

    fn target_logprobs(
        hidden: Tensor<Flex, 2>,
        head: &Tensor<Flex, 2>,
        targets: &[u32],
    ) -> Vec<f32> {
        let width = hidden.dims()[1];
        let (h, w) = (Values::of(hidden), Values::of(head.clone()));
        head::target_logprobs(h.slice(), w.slice(), width, targets)
    }

    fn head_loss(
        student: Tensor<Flex, 2>,
        head: &Tensor<Flex, 2>,
        terms: HeadTerms<Flex>,
    ) -> HeadLoss<Flex> {
        let (loss, _) = head_loss_values(primitive(student), head, &terms, false);
        loss
    }
}

/// The attention shapes of queries `[b, t, h, d]` and keys `[b, T, kv_heads, d]`.
pub(super) fn attention_dims(
    [b, t, h, d]: [usize; 4],
    [kb, len, kvh, kd]: [usize; 4],
) -> attention::Dims {
    assert!(
        kb == b && kd == d,
        "key shape {:?} for queries {:?}",
        [kb, len, kvh, kd],
        [b, t, h, d]
    );
    attention::Dims {
        batch: b,
        queries: t,
        heads: h,
        head_dim: d,
        keys: len,
        kv_heads: kvh,
    }
}

/// [`head::head_loss`] on burn-flex tensors: the loss as a tensor with the values of its
/// terms, and (with `with_grad`) the gradient for the student's hidden states.
pub(super) fn head_loss_values(
    student: FlexTensor,
    head_weight: &Tensor<Flex, 2>,
    terms: &HeadTerms<Flex>,
    with_grad: bool,
) -> (HeadLoss<Flex>, Option<Vec<f32>>) {
    let width = head_weight.dims()[0];
    let s = Values::new(student);
    let w = Values::of(head_weight.clone());
    let teacher = terms
        .teacher
        .as_ref()
        .map(|(t, temp)| (Values::of(t.clone()), *temp as f32));
    let loss = head::head_loss(
        s.slice(),
        w.slice(),
        width,
        &head::LossTerms {
            teacher: teacher.as_ref().map(|(t, temp)| (t.slice(), *temp)),
            targets: terms.targets.map(|(t, w)| (t, w as f32)),
        },
        with_grad,
    );
    let weight = terms.targets.map_or(0.0, |(_, w)| w);
    let value = loss.distill.unwrap_or(0.0) + loss.ntp.map_or(0.0, |v| v * weight);
    (
        HeadLoss {
            loss: new_tensor(vec![value as f32], [1]),
            distill: loss.distill,
            ntp: loss.ntp,
        },
        loss.grad,
    )
}
