//! Data-parallel mask training through burn's collective: the global batch is split into
//! equal shards, one per device (a peer, on its own thread); each peer's losses and
//! gradients, scaled by `1 / peers`, are summed by one all-reduce, and the host-side
//! minimax and Adam update runs once on the sum.
//!
//! Against one device the sums inside each shard's matrix products run in another order,
//! so the results agree to rounding, not bit for bit. Several processes (machines) each take
//! an equal share of the batch first and sum over TCP ([`crate::nodes`]): burn-collective
//! 0.21.0's own global all-reduce waits forever on its second call (DEVELOPERS.md,
//! "Data-parallel training").

use crate::nodes::Nodes;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData, TensorPrimitive};
use burn_collective::{
    all_reduce, finish_collective, register, CollectiveConfig, PeerId, ReduceOperation,
};

/// The devices a run's batches are split over, one peer each, in this process and, for a
/// run over several processes, in each of the `nodes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peers {
    /// How many devices (peers) of this process take part.
    pub devices: usize,
    /// The processes taking part, each with as many devices.
    pub nodes: Nodes,
}

impl Default for Peers {
    fn default() -> Self {
        Peers::single()
    }
}

impl Peers {
    /// One device in one process: no collective at all.
    pub fn single() -> Self {
        Peers::devices(1)
    }

    /// `devices` devices in one process.
    pub fn devices(devices: usize) -> Self {
        Peers {
            devices,
            nodes: Nodes::single(),
        }
    }

    /// Whether this process splits its share of a batch over devices (more than one peer).
    pub fn is_parallel(&self) -> bool {
        self.devices > 1
    }

    /// Each device's share of the batch's gradients: `1 / (devices · nodes)`.
    pub fn scale(&self) -> f32 {
        1.0 / (self.devices * self.nodes.count) as f32
    }

    /// Refuses a batch that does not split into equal shards.
    pub fn check(&self, batch: usize) -> Result<(), String> {
        if self.devices == 0 {
            return Err("no devices given".into());
        }
        self.nodes.check()?;
        let n = self.devices * self.nodes.count;
        if !batch.is_multiple_of(n) {
            let what = if self.nodes.count > 1 {
                "one per device of each node"
            } else {
                "one per device"
            };
            return Err(format!(
                "train.batch = {batch} does not split into {n} equal shards ({what}); make it a multiple of {n}"
            ));
        }
        Ok(())
    }

    /// This process's shards of a batch: `(peer id, rows)` per device, in order, from this
    /// node's consecutive share of the batch.
    pub fn shards<'a>(&self, batch: &'a [usize]) -> Vec<(usize, &'a [usize])> {
        let share = batch.len() / self.nodes.count;
        let batch = &batch[self.nodes.rank * share..(self.nodes.rank + 1) * share];
        let size = share / self.devices;
        (0..self.devices)
            .map(|k| (k, &batch[k * size..(k + 1) * size]))
            .collect()
    }

    /// Registers every device with the collective (all at once: each call returns when all
    /// have); the returned guard unregisters them.
    pub fn join<B: Backend>(&self, devices: &[B::Device]) -> Result<Membership<B>, String> {
        assert_eq!(devices.len(), self.devices, "one device per peer");
        let config = CollectiveConfig::default().with_num_devices(self.devices);
        let ids: Vec<PeerId> = (0..self.devices).map(|k| PeerId(k as u32)).collect();
        std::thread::scope(|s| {
            let joins: Vec<_> = ids
                .iter()
                .zip(devices)
                .map(|(&id, device)| {
                    let config = config.clone();
                    s.spawn(move || register::<B>(id, device.clone(), config))
                })
                .collect();
            joins
                .into_iter()
                .map(|j| j.join().expect("register thread"))
                .collect::<Result<Vec<()>, _>>()
        })
        .map_err(|e| format!("cannot join the collective: {e:?}"))?;
        Ok(Membership {
            ids,
            _backend: std::marker::PhantomData,
        })
    }
}

/// Registered peers; unregistered when dropped.
pub struct Membership<B: Backend> {
    ids: Vec<PeerId>,
    _backend: std::marker::PhantomData<B>,
}

impl<B: Backend> Membership<B> {
    /// The sum over every peer of `values` (each peer's own, already scaled), for peer `id`,
    /// on `device`. Every peer must call it with as many values.
    pub fn sum(&self, id: usize, values: Vec<f32>, device: &B::Device) -> Result<Vec<f32>, String> {
        let n = values.len();
        let t = Tensor::<B, 1>::from_data(TensorData::new(values, [n]), device);
        let summed = all_reduce::<B>(
            PeerId(id as u32),
            t.into_primitive().tensor(),
            ReduceOperation::Sum,
        )
        .map_err(|e| format!("all-reduce failed: {e:?}"))?;
        Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(summed))
            .into_data()
            .convert::<f32>()
            .to_vec()
            .map_err(|e| format!("all-reduce result: {e:?}"))
    }
}

impl<B: Backend> Drop for Membership<B> {
    fn drop(&mut self) {
        for &id in &self.ids {
            let _ = finish_collective::<B>(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_the_batch_in_order_one_per_device() {
        let batch = [10, 11, 12, 13, 14, 15, 16, 17];
        let two = Peers::devices(2);
        assert_eq!(
            two.shards(&batch),
            vec![(0, &batch[0..4]), (1, &batch[4..8])]
        );
        assert!(two.is_parallel());
        assert!(!Peers::single().is_parallel());
        // The second of two nodes, with two devices: the batch's second half, halved.
        let node = Peers {
            devices: 2,
            nodes: Nodes {
                count: 2,
                rank: 1,
                coordinator: "127.0.0.1:1".into(),
            },
        };
        assert_eq!(
            node.shards(&batch),
            vec![(0, &batch[4..6]), (1, &batch[6..8])]
        );
        assert_eq!(node.scale(), 0.25);
    }

    #[test]
    fn a_batch_that_does_not_split_is_refused() {
        let three = Peers::devices(3);
        assert!(three.check(4).unwrap_err().contains("multiple of 3"));
        assert!(three.check(6).is_ok());
        assert!(Peers::devices(0).check(4).is_err());
    }
}
