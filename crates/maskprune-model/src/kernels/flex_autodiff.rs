//! `Autodiff<Flex>`: each decoder operation is one node of burn's autodiff graph whose
//! forward is the burn-flex kernel and whose backward is a hand-written CPU kernel (burn's
//! backend extension for autodiff). The weights are frozen (never tracked), so only the
//! gradients of the activations are computed; what a backward needs is kept from the
//! forward by reference (burn-flex tensors share their storage), never copied.
//!
//! The masks and LoRA adapters stay burn tensor ops: their products are small, and burn's
//! autodiff derives their gradients.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::{Autodiff, Flex};
use burn::tensor::{Tensor, TensorPrimitive};
use burn_flex::FlexTensor;

use super::flex::{attention_dims, head_loss_values, new_tensor, primitive, wrap, Values};
use super::{composed, HeadLoss, HeadTerms, Kernels};
use crate::cpu_kernels::{self, attention, gemm, pointwise};
use crate::rope::Rotary;

type Ad = Autodiff<Flex>;
/// The autodiff tensor of burn-flex (value and graph node).
type AdTensor = <Ad as burn::tensor::backend::BackendTypes>::FloatTensorPrimitive;

/// The autodiff primitive inside `x`.
fn node<const D: usize>(x: Tensor<Ad, D>) -> AdTensor {
    x.into_primitive().tensor()
}

/// `t` as a tensor.
fn ad<const D: usize>(t: AdTensor) -> Tensor<Ad, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// The values of a constant (a frozen weight), outside the graph.
fn constant<const D: usize>(x: &Tensor<Ad, D>) -> Tensor<Flex, D> {
    x.clone().inner()
}

/// A gradient as a burn-flex tensor of `shape`.
fn gradient(values: Vec<f32>, shape: burn::tensor::Shape) -> FlexTensor {
    primitive(Tensor::<Flex, 1>::from_data(
        burn::tensor::TensorData::new(values, [shape.num_elements()]),
        &Default::default(),
    ))
    .reshape(shape)
}

/// `x · W` with `W` frozen: `dx = g · Wᵀ`.
#[derive(Debug)]
struct LinearBackward;

impl Backward<Flex, 1> for LinearBackward {
    /// The weight, and the input's shape.
    type State = (FlexTensor, burn::tensor::Shape);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (weight, shape) = ops.state;
        let g = grads.consume::<Flex>(&ops.node);
        let [parent] = ops.parents;
        if let Some(parent) = parent {
            grads.register::<Flex>(parent.id, input_gradient(g, &weight, shape));
        }
    }
}

/// `g · Wᵀ` for `g` `[.., n]` and `W` `[k, n]`, shaped as the input `shape` (`[.., k]`).
fn input_gradient(g: FlexTensor, weight: &FlexTensor, shape: burn::tensor::Shape) -> FlexTensor {
    let dims = weight.layout().shape().dims::<2>();
    let [k, n] = [dims[0], dims[1]];
    let m = shape.num_elements() / k;
    let (g, w) = (Values::new(g), Values::new(weight.clone()));
    gradient(
        gemm::matmul_transposed(g.slice(), w.slice(), [m, n, k]),
        shape,
    )
}

/// `residual + x · W` with `W` frozen: `d_residual = g`, `dx = g · Wᵀ`.
#[derive(Debug)]
struct LinearAddBackward;

impl Backward<Flex, 2> for LinearAddBackward {
    type State = (FlexTensor, burn::tensor::Shape);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (weight, shape) = ops.state;
        let g = grads.consume::<Flex>(&ops.node);
        let [residual, x] = ops.parents;
        if let Some(x) = x {
            grads.register::<Flex>(x.id, input_gradient(g.clone(), &weight, shape));
        }
        if let Some(residual) = residual {
            grads.register::<Flex>(residual.id, g);
        }
    }
}

/// `silu(gate) * up`.
#[derive(Debug)]
struct SwigluBackward;

impl Backward<Flex, 2> for SwigluBackward {
    /// Gate and up.
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (gate, up) = ops.state;
        let shape = gate.layout().shape().clone();
        let g = Values::new(grads.consume::<Flex>(&ops.node));
        let (gate, up) = (Values::new(gate), Values::new(up));
        let (d_gate, d_up) = pointwise::swiglu_backward(gate.slice(), up.slice(), g.slice());
        let [gate_node, up_node] = ops.parents;
        if let Some(n) = gate_node {
            grads.register::<Flex>(n.id, gradient(d_gate, shape.clone()));
        }
        if let Some(n) = up_node {
            grads.register::<Flex>(n.id, gradient(d_up, shape));
        }
    }
}

/// Runs of `group` values scaled by a mask: `dx = g·m` (the same scaling), `dm` the runs'
/// sums of `g·x`.
#[derive(Debug)]
struct ScaleGroupsBackward;

impl Backward<Flex, 2> for ScaleGroupsBackward {
    /// The input, the mask, the run length.
    type State = (FlexTensor, FlexTensor, usize);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (x, m, group) = ops.state;
        let shape = x.layout().shape().clone();
        let g = Values::new(grads.consume::<Flex>(&ops.node));
        let (x, m) = (Values::new(x), Values::new(m));
        let [x_node, m_node] = ops.parents;
        if let Some(n) = x_node {
            let dx = pointwise::scale_groups(g.slice(), m.slice(), group);
            grads.register::<Flex>(n.id, gradient(dx, shape));
        }
        if let Some(n) = m_node {
            let len = m.slice().len();
            let dm = pointwise::scale_groups_gradient(x.slice(), g.slice(), len, group);
            grads.register::<Flex>(n.id, gradient(dm, [len].into()));
        }
    }
}

/// RMSNorm with a frozen weight.
#[derive(Debug)]
struct RmsNormBackward;

impl Backward<Flex, 1> for RmsNormBackward {
    /// The input, the weight, `eps`.
    type State = (FlexTensor, FlexTensor, f64);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (x, weight, eps) = ops.state;
        let shape = x.layout().shape().clone();
        let g = Values::new(grads.consume::<Flex>(&ops.node));
        let [parent] = ops.parents;
        if let Some(parent) = parent {
            let (x, w) = (Values::new(x), Values::new(weight));
            let dx = pointwise::rms_norm_backward(x.slice(), w.slice(), eps, g.slice());
            grads.register::<Flex>(parent.id, gradient(dx, shape));
        }
    }
}

/// The rotary embedding: its transpose is the rotation by the opposite angles.
#[derive(Debug)]
struct RotaryBackward;

impl Backward<Flex, 1> for RotaryBackward {
    /// The cosine and negated sine tables, and the input's shape.
    type State = (std::sync::Arc<(Vec<f32>, Vec<f32>)>, [usize; 4]);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (tables, shape) = ops.state;
        let g = Values::new(grads.consume::<Flex>(&ops.node));
        let [parent] = ops.parents;
        if let Some(parent) = parent {
            let dx = pointwise::rotary(g.slice(), &tables.0, &tables.1, shape);
            grads.register::<Flex>(parent.id, gradient(dx, shape.into()));
        }
    }
}

/// Causal grouped-query attention.
#[derive(Debug)]
struct AttentionBackward;

impl Backward<Flex, 3> for AttentionBackward {
    /// Queries, keys, values, the output, each row's log-sum-exp, the shapes.
    type State = ([FlexTensor; 4], Vec<f32>, attention::Dims);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let ([q, k, v, out], lse, dims) = ops.state;
        let (q_shape, kv_shape) = (q.layout().shape().clone(), k.layout().shape().clone());
        let g = Values::new(grads.consume::<Flex>(&ops.node));
        let [q, k, v, out] = [q, k, v, out].map(Values::new);
        let (dq, dk, dv) = attention::backward(
            q.slice(),
            k.slice(),
            v.slice(),
            out.slice(),
            &lse,
            g.slice(),
            &dims,
        );
        let [q_node, k_node, v_node] = ops.parents;
        for (node, grad, shape) in [
            (q_node, dq, q_shape),
            (k_node, dk, kv_shape.clone()),
            (v_node, dv, kv_shape),
        ] {
            if let Some(node) = node {
                grads.register::<Flex>(node.id, gradient(grad, shape));
            }
        }
    }
}

/// The head loss: its gradient for the student's hidden states is computed with the loss
/// (the logits exist only block by block), and scaled by the incoming gradient here.
#[derive(Debug)]
struct HeadLossBackward;

impl Backward<Flex, 1> for HeadLossBackward {
    /// `d loss / d student`, `[rows, width]`.
    type State = FlexTensor;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let g = Values::new(grads.consume::<Flex>(&ops.node));
        let [parent] = ops.parents;
        if let Some(parent) = parent {
            let scale = g.slice()[0];
            let grad = wrap::<2>(ops.state).mul_scalar(scale);
            grads.register::<Flex>(parent.id, primitive(grad));
        }
    }
}

impl Kernels for Ad {
    fn keeps_stored_dtype() -> bool {
        true
    }

    fn run<R: Send>(f: impl FnOnce() -> R + Send) -> R {
        cpu_kernels::on_pool(f)
    }

    /// A weight that requires gradients (LLM-Pruner's Taylor scores) takes burn's matmul.
    fn frozen_linear(x: Tensor<Ad, 3>, weight: &Tensor<Ad, 2>) -> Tensor<Ad, 3> {
        if weight.is_require_grad() {
            return composed::linear(x, weight);
        }
        let weight = constant(weight);
        let x = node(x);
        let shape = x.primitive.layout().shape().clone();
        let out = |x: FlexTensor| primitive(Flex::frozen_linear(wrap(x), &weight));
        ad(
            match LinearBackward
                .prepare::<NoCheckpointing>([x.node.clone()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => {
                    prep.finish((primitive(weight.clone()), shape), out(x.primitive))
                }
                OpsKind::UnTracked(prep) => prep.finish(out(x.primitive)),
            },
        )
    }

    fn frozen_linear_add(
        residual: Tensor<Ad, 3>,
        x: Tensor<Ad, 3>,
        weight: &Tensor<Ad, 2>,
    ) -> Tensor<Ad, 3> {
        if weight.is_require_grad() {
            return residual + composed::linear(x, weight);
        }
        let weight = constant(weight);
        let (residual, x) = (node(residual), node(x));
        let shape = x.primitive.layout().shape().clone();
        let out = |r: FlexTensor, x: FlexTensor| {
            primitive(Flex::frozen_linear_add(wrap(r), wrap(x), &weight))
        };
        ad(
            match LinearAddBackward
                .prepare::<NoCheckpointing>([residual.node.clone(), x.node.clone()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => prep.finish(
                    (primitive(weight.clone()), shape),
                    out(residual.primitive, x.primitive),
                ),
                OpsKind::UnTracked(prep) => prep.finish(out(residual.primitive, x.primitive)),
            },
        )
    }

    fn swiglu(gate: Tensor<Ad, 3>, up: Tensor<Ad, 3>) -> Tensor<Ad, 3> {
        let (gate, up) = (node(gate), node(up));
        let out = |g: FlexTensor, u: FlexTensor| primitive(Flex::swiglu(wrap(g), wrap(u)));
        ad(
            match SwigluBackward
                .prepare::<NoCheckpointing>([gate.node.clone(), up.node.clone()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => {
                    let state = (gate.primitive.clone(), up.primitive.clone());
                    prep.finish(state, out(gate.primitive, up.primitive))
                }
                OpsKind::UnTracked(prep) => prep.finish(out(gate.primitive, up.primitive)),
            },
        )
    }

    fn scale_groups<const D: usize>(
        x: Tensor<Ad, D>,
        m: Tensor<Ad, 1>,
        group: usize,
    ) -> Tensor<Ad, D> {
        let (x, m) = (node(x), node(m));
        let out = |x: FlexTensor, m: FlexTensor| {
            primitive(Flex::scale_groups(wrap::<D>(x), wrap(m), group))
        };
        ad(
            match ScaleGroupsBackward
                .prepare::<NoCheckpointing>([x.node.clone(), m.node.clone()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => {
                    let state = (x.primitive.clone(), m.primitive.clone(), group);
                    prep.finish(state, out(x.primitive, m.primitive))
                }
                OpsKind::UnTracked(prep) => prep.finish(out(x.primitive, m.primitive)),
            },
        )
    }

    fn rms_norm(x: Tensor<Ad, 3>, weight: &Tensor<Ad, 1>, eps: f64) -> Tensor<Ad, 3> {
        let weight = constant(weight);
        let x = node(x);
        let out = |x: FlexTensor| primitive(Flex::rms_norm(wrap(x), &weight, eps));
        ad(
            match RmsNormBackward
                .prepare::<NoCheckpointing>([x.node.clone()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => {
                    let state = (x.primitive.clone(), primitive(weight.clone()), eps);
                    prep.finish(state, out(x.primitive))
                }
                OpsKind::UnTracked(prep) => prep.finish(out(x.primitive)),
            },
        )
    }

    fn rotary(x: Tensor<Ad, 4>, tables: &Rotary<Ad>) -> Tensor<Ad, 4> {
        let shape = x.dims();
        let x = node(x);
        let (cos, sin) = tables.host();
        let out = |x: FlexTensor| {
            let x = Values::new(x);
            primitive(new_tensor(
                pointwise::rotary(x.slice(), cos, sin, shape),
                shape,
            ))
        };
        ad(
            match RotaryBackward
                .prepare::<NoCheckpointing>([x.node.clone()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => prep.finish((tables.inverse(), shape), out(x.primitive)),
                OpsKind::UnTracked(prep) => prep.finish(out(x.primitive)),
            },
        )
    }

    fn causal_attention(q: Tensor<Ad, 4>, k: Tensor<Ad, 4>, v: Tensor<Ad, 4>) -> Tensor<Ad, 4> {
        let shape = q.dims();
        let dims = attention_dims(shape, k.dims());
        let (q, k, v) = (node(q), node(k), node(v));
        let nodes = [q.node.clone(), k.node.clone(), v.node.clone()];
        ad(
            match AttentionBackward
                .prepare::<NoCheckpointing>(nodes)
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => {
                    let mut lse = vec![0.0f32; dims.batch * dims.queries * dims.heads];
                    let out = {
                        let [qv, kv, vv] = [&q.primitive, &k.primitive, &v.primitive]
                            .map(|t| Values::new(t.clone()));
                        attention::forward(
                            qv.slice(),
                            kv.slice(),
                            vv.slice(),
                            &dims,
                            Some(&mut lse),
                        )
                    };
                    let out = primitive(new_tensor(out, shape));
                    let state = (
                        [q.primitive, k.primitive, v.primitive, out.clone()],
                        lse,
                        dims,
                    );
                    prep.finish(state, out)
                }
                OpsKind::UnTracked(prep) => prep.finish(primitive(Flex::causal_attention(
                    wrap(q.primitive),
                    wrap(k.primitive),
                    wrap(v.primitive),
                ))),
            },
        )
    }

    fn target_logprobs(hidden: Tensor<Ad, 2>, head: &Tensor<Ad, 2>, targets: &[u32]) -> Vec<f32> {
        Flex::target_logprobs(hidden.inner(), &constant(head), targets)
    }

    fn head_loss(
        student: Tensor<Ad, 2>,
        head: &Tensor<Ad, 2>,
        terms: HeadTerms<Ad>,
    ) -> HeadLoss<Ad> {
        let head = constant(head);
        let student = node(student);
        let shape = student.primitive.layout().shape().clone();
        let terms = HeadTerms {
            teacher: terms.teacher.map(|(t, temp)| (t.inner(), temp)),
            targets: terms.targets,
        };
        let prep = HeadLossBackward
            .prepare::<NoCheckpointing>([student.node.clone()])
            .compute_bound()
            .stateful();
        let tracked = matches!(prep, OpsKind::Tracked(_));
        let (loss, grad) = head_loss_values(student.primitive, &head, &terms, tracked);
        let value = primitive(loss.loss);
        let out = match prep {
            OpsKind::Tracked(prep) => {
                let grad = grad.expect("asked for with the tracked student");
                prep.finish(gradient(grad, shape), value)
            }
            OpsKind::UnTracked(prep) => prep.finish(value),
        };
        HeadLoss {
            loss: ad(out),
            distill: loss.distill,
            ntp: loss.ntp,
        }
    }
}
