//! ggml tensor encodings and their dequantisation to f32 (layouts as in ggml's `ggml-quants.c`).

use half::{bf16, f16};

/// A ggml tensor encoding this crate can read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    /// 32-bit float.
    F32,
    /// 16-bit IEEE float.
    F16,
    /// bfloat16.
    BF16,
    /// 4-bit, one f16 scale per 32 values.
    Q4_0,
    /// 4-bit, f16 scale and minimum per 32 values.
    Q4_1,
    /// 5-bit, f16 scale per 32 values.
    Q5_0,
    /// 5-bit, f16 scale and minimum per 32 values.
    Q5_1,
    /// 8-bit, f16 scale per 32 values.
    Q8_0,
    /// 4-bit K-quant, super-blocks of 256.
    Q4K,
    /// 5-bit K-quant, super-blocks of 256.
    Q5K,
    /// 6-bit K-quant, super-blocks of 256.
    Q6K,
}

impl GgmlType {
    /// The type for a ggml type id, if supported.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4K,
            13 => GgmlType::Q5K,
            14 => GgmlType::Q6K,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    /// Values per block.
    pub fn block_size(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => {
                32
            }
            GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q5_0 => 22,
            GgmlType::Q5_1 => 24,
            GgmlType::Q8_0 => 34,
            GgmlType::Q4K => 144,
            GgmlType::Q5K => 176,
            GgmlType::Q6K => 210,
        }
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantises one block `b` (exactly `block_bytes` long) into `out` (`block_size` long).
pub fn dequantize_block(ty: GgmlType, b: &[u8], out: &mut [f32]) {
    match ty {
        GgmlType::F32 => out[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        GgmlType::F16 => out[0] = f16_at(b, 0),
        GgmlType::BF16 => out[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        GgmlType::Q4_0 => {
            let d = f16_at(b, 0);
            for j in 0..16 {
                let q = b[2 + j];
                out[j] = ((q & 0x0F) as i32 - 8) as f32 * d;
                out[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
            }
        }
        GgmlType::Q4_1 => {
            let (d, m) = (f16_at(b, 0), f16_at(b, 2));
            for j in 0..16 {
                let q = b[4 + j];
                out[j] = (q & 0x0F) as f32 * d + m;
                out[j + 16] = (q >> 4) as f32 * d + m;
            }
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            let (d, m, off) = if ty == GgmlType::Q5_0 {
                (f16_at(b, 0), 0.0, 2)
            } else {
                (f16_at(b, 0), f16_at(b, 2), 4)
            };
            let qh = u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]]);
            let qs = &b[off + 4..off + 20];
            let shift = if ty == GgmlType::Q5_0 { 16 } else { 0 };
            for j in 0..16 {
                let xh0 = (((qh >> j) << 4) & 0x10) as i32;
                let xh1 = ((qh >> (j + 12)) & 0x10) as i32;
                let x0 = ((qs[j] & 0x0F) as i32 | xh0) - shift;
                let x1 = ((qs[j] >> 4) as i32 | xh1) - shift;
                out[j] = x0 as f32 * d + m;
                out[j + 16] = x1 as f32 * d + m;
            }
        }
        GgmlType::Q8_0 => {
            let d = f16_at(b, 0);
            for j in 0..32 {
                out[j] = (b[2 + j] as i8) as f32 * d;
            }
        }
        GgmlType::Q4K | GgmlType::Q5K => {
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            let scales = &b[4..16];
            let (qh, qs) = if ty == GgmlType::Q5K {
                (Some(&b[16..48]), &b[48..176])
            } else {
                (None, &b[16..144])
            };
            let (mut u1, mut u2) = (1u8, 2u8);
            for (chunk, j) in (0..256).step_by(64).enumerate() {
                let q = &qs[chunk * 32..chunk * 32 + 32];
                let (sc1, m1) = scale_min_k4(2 * chunk, scales);
                let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
                let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
                let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
                for l in 0..32 {
                    let (hi1, hi2) = match qh {
                        Some(h) => ((h[l] & u1 != 0) as u8 * 16, (h[l] & u2 != 0) as u8 * 16),
                        None => (0, 0),
                    };
                    out[j + l] = d1 * ((q[l] & 0x0F) + hi1) as f32 - m1;
                    out[j + 32 + l] = d2 * ((q[l] >> 4) + hi2) as f32 - m2;
                }
                u1 <<= 2;
                u2 <<= 2;
            }
        }
        GgmlType::Q6K => {
            let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
            let d = f16_at(b, 208);
            for half in 0..2 {
                let (ql, qh, sc) = (&ql[half * 64..], &qh[half * 32..], &sc[half * 8..]);
                let y = &mut out[half * 128..half * 128 + 128];
                for l in 0..32 {
                    let is = l / 16;
                    let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
                    let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                    let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                    let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                    y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                    y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                    y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                    y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
                }
            }
        }
    }
}

fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Dequantises a whole tensor's bytes (a multiple of the block size) to f32, in parallel.
pub fn dequantize(ty: GgmlType, bytes: &[u8]) -> Vec<f32> {
    use rayon::prelude::*;
    let (bs, bb) = (ty.block_size(), ty.block_bytes());
    let blocks = bytes.len() / bb;
    let mut out = vec![0.0f32; blocks * bs];
    // Chunks of many blocks keep the parallel overhead small.
    const BLOCKS_PER_TASK: usize = 1024;
    out.par_chunks_mut(bs * BLOCKS_PER_TASK)
        .zip(bytes.par_chunks(bb * BLOCKS_PER_TASK))
        .for_each(|(o, b)| {
            for (oo, bb_) in o.chunks_exact_mut(bs).zip(b.chunks_exact(bb)) {
                dequantize_block(ty, bb_, oo);
            }
        });
    out
}

impl GgmlType {
    /// The ggml type id (GGUF's tensor type field).
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q4K => 12,
            GgmlType::Q5K => 13,
            GgmlType::Q6K => 14,
            GgmlType::BF16 => 30,
        }
    }

    /// The name llama.cpp prints.
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "f32",
            GgmlType::F16 => "f16",
            GgmlType::BF16 => "bf16",
            GgmlType::Q4_0 => "q4_0",
            GgmlType::Q4_1 => "q4_1",
            GgmlType::Q5_0 => "q5_0",
            GgmlType::Q5_1 => "q5_1",
            GgmlType::Q8_0 => "q8_0",
            GgmlType::Q4K => "q4_k",
            GgmlType::Q5K => "q5_k",
            GgmlType::Q6K => "q6_k",
        }
    }

    /// Whether [`quantize`] writes this type.
    pub fn encodable(self) -> bool {
        matches!(
            self,
            GgmlType::F32
                | GgmlType::F16
                | GgmlType::BF16
                | GgmlType::Q8_0
                | GgmlType::Q4_0
                | GgmlType::Q4K
                | GgmlType::Q6K
        )
    }
}

/// `fval` rounded to the nearest integer, ties to even (ggml's `nearest_int`).
fn nearest_int(fval: f32) -> i32 {
    fval.round_ties_even() as i32
}

/// Encodes `values` (a multiple of the block size) as `ty`, the way ggml's reference
/// quantizers (`quantize_row_*_ref`) do; only the [`GgmlType::encodable`] types.
pub fn quantize(ty: GgmlType, values: &[f32]) -> Vec<u8> {
    use rayon::prelude::*;
    assert!(ty.encodable(), "no encoder for {ty:?}");
    let (bs, bb) = (ty.block_size(), ty.block_bytes());
    assert_eq!(
        values.len() % bs,
        0,
        "{} values do not fill {ty:?} blocks",
        values.len()
    );
    let mut out = vec![0u8; values.len() / bs * bb];
    const BLOCKS_PER_TASK: usize = 256;
    out.par_chunks_mut(bb * BLOCKS_PER_TASK)
        .zip(values.par_chunks(bs * BLOCKS_PER_TASK))
        .for_each(|(o, x)| {
            for (o, x) in o.chunks_exact_mut(bb).zip(x.chunks_exact(bs)) {
                quantize_block(ty, x, o);
            }
        });
    out
}

fn quantize_block(ty: GgmlType, x: &[f32], b: &mut [u8]) {
    let put_f16 = |b: &mut [u8], at: usize, v: f32| {
        b[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes())
    };
    match ty {
        GgmlType::F32 => b.copy_from_slice(&x[0].to_le_bytes()),
        GgmlType::F16 => put_f16(b, 0, x[0]),
        GgmlType::BF16 => b.copy_from_slice(&bf16::from_f32(x[0]).to_le_bytes()),
        GgmlType::Q8_0 => {
            let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            put_f16(b, 0, d);
            for (q, &v) in b[2..34].iter_mut().zip(x) {
                *q = ((v * id).round() as i8) as u8;
            }
        }
        GgmlType::Q4_0 => {
            // The value of largest magnitude, with its sign, maps to -8.
            let max = x
                .iter()
                .fold(0.0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
            let d = max / -8.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            put_f16(b, 0, d);
            for j in 0..16 {
                let q0 = ((x[j] * id + 8.5) as i8).min(15) as u8;
                let q1 = ((x[j + 16] * id + 8.5) as i8).min(15) as u8;
                b[2 + j] = q0 | (q1 << 4);
            }
        }
        GgmlType::Q4K => quantize_q4_k(x, b),
        GgmlType::Q6K => quantize_q6_k(x, b),
        _ => unreachable!("checked by `encodable`"),
    }
}

/// ggml's `make_qkx2_quants`: a scale and a minimum for `x` (weighted by `w`) on the levels
/// `0..=nmax`, searched over `nstep` candidate scales; levels into `l`. Returns `(scale,
/// -min)`.
fn make_qkx2_quants(x: &[f32], w: &[f32], nmax: i32, l: &mut [u8]) -> (f32, f32) {
    let (rmin, rdelta, nstep) = (-1.0f32, 0.1f32, 20);
    let n = x.len();
    let mut min = x.iter().cloned().fold(f32::INFINITY, f32::min);
    let max = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let sum_w: f32 = w.iter().sum();
    let sum_x: f32 = x.iter().zip(w).map(|(x, w)| x * w).sum();
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l.fill(0);
        return (0.0, -min);
    }
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for i in 0..n {
        let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l[i] = q as u8;
        let diff = scale * q as f32 + min - x[i];
        best_error += w[i] * diff * diff;
    }
    let mut laux = [0u8; 32];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..n {
            let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = q as u8;
            let q = q as f32;
            sum_l += w[i] * q;
            sum_l2 += w[i] * q * q;
            sum_xl += w[i] * q * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let cur_error: f32 = (0..n)
                .map(|i| {
                    let diff = this_scale * laux[i] as f32 + this_min - x[i];
                    w[i] * diff * diff
                })
                .sum();
            if cur_error < best_error {
                l[..n].copy_from_slice(&laux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// ggml's `quantize_row_q4_K_ref` for one super-block of 256: 8 sub-blocks of 32 with
/// 6-bit scales and minimums.
fn quantize_q4_k(x: &[f32], b: &mut [u8]) {
    let mut levels = [0u8; 256];
    let (mut scales, mut mins) = ([0.0f32; 8], [0.0f32; 8]);
    for j in 0..8 {
        let xs = &x[32 * j..32 * (j + 1)];
        let av_x = (xs.iter().map(|v| v * v).sum::<f32>() / 32.0).sqrt();
        let w: Vec<f32> = xs.iter().map(|v| av_x + v.abs()).collect();
        let (s, m) = make_qkx2_quants(xs, &w, 15, &mut levels[32 * j..32 * (j + 1)]);
        scales[j] = s;
        mins[j] = m;
    }
    let max_scale = scales.iter().cloned().fold(0.0f32, f32::max);
    let max_min = mins.iter().cloned().fold(0.0f32, f32::max);
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut sc = [0u8; 12];
    for j in 0..8 {
        let ls = nearest_int(inv_scale * scales[j]).min(63) as u8;
        let lm = nearest_int(inv_min * mins[j]).min(63) as u8;
        if j < 4 {
            sc[j] = ls;
            sc[j + 4] = lm;
        } else {
            sc[j + 4] = (ls & 0x0F) | ((lm & 0x0F) << 4);
            sc[j - 4] |= (ls >> 4) << 6;
            sc[j] |= (lm >> 4) << 6;
        }
    }
    let d = f16::from_f32(max_scale / 63.0);
    let dmin = f16::from_f32(max_min / 63.0);
    b[0..2].copy_from_slice(&d.to_le_bytes());
    b[2..4].copy_from_slice(&dmin.to_le_bytes());
    b[4..16].copy_from_slice(&sc);
    for j in 0..8 {
        let (s, m) = scale_min_k4(j, &sc);
        let dj = d.to_f32() * s as f32;
        if dj == 0.0 {
            continue;
        }
        let dm = dmin.to_f32() * m as f32;
        for i in 0..32 {
            levels[32 * j + i] = nearest_int((x[32 * j + i] + dm) / dj).clamp(0, 15) as u8;
        }
    }
    let qs = &mut b[16..144];
    for (chunk, j) in (0..256).step_by(64).enumerate() {
        for l in 0..32 {
            qs[chunk * 32 + l] = levels[j + l] | (levels[j + l + 32] << 4);
        }
    }
}

/// ggml's `make_qx_quants` (`rmse_type` 1): a symmetric scale for `x` on the levels
/// `-nmax..nmax`, searched over 19 candidates, weighted by `x²`; levels (offset by `nmax`)
/// into `l`.
fn make_qx_quants(x: &[f32], nmax: i32, l: &mut [u8]) -> f32 {
    let (amax, max) = x.iter().fold((0.0f32, 0.0f32), |(a, m), &v| {
        if v.abs() > a {
            (v.abs(), v)
        } else {
            (a, m)
        }
    });
    if amax < 1e-15 {
        l.fill(0);
        return 0.0;
    }
    let level = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    let sums = |iscale: f32| {
        x.iter().fold((0.0f32, 0.0f32), |(sx, s2), &v| {
            let (q, w) = (level(iscale, v) as f32, v * v);
            (sx + w * v * q, s2 + w * q * q)
        })
    };
    let mut iscale = -(nmax as f32) / max;
    let (sumlx, suml2) = sums(iscale);
    let mut scale = if suml2 > 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        let candidate = -(nmax as f32 + 0.1 * is as f32) / max;
        let (sumlx, suml2) = sums(candidate);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            scale = sumlx / suml2;
            best = scale * sumlx;
            iscale = candidate;
        }
    }
    for (l, &v) in l.iter_mut().zip(x) {
        *l = (level(iscale, v) + nmax) as u8;
    }
    scale
}

/// ggml's `quantize_row_q6_K_ref` for one super-block of 256: 16 sub-blocks of 16 with 8-bit
/// scales, 6-bit levels split into low and high bits.
fn quantize_q6_k(x: &[f32], b: &mut [u8]) {
    let mut levels = [0u8; 256];
    let mut scales = [0.0f32; 16];
    for j in 0..16 {
        scales[j] = make_qx_quants(
            &x[16 * j..16 * (j + 1)],
            32,
            &mut levels[16 * j..16 * (j + 1)],
        );
    }
    let max_scale = scales
        .iter()
        .cloned()
        .fold(0.0f32, |m, s| if s.abs() > m.abs() { s } else { m });
    if max_scale.abs() < 1e-15 {
        b.fill(0);
        return;
    }
    let iscale = -128.0 / max_scale;
    let d = f16::from_f32(1.0 / iscale);
    let mut sc = [0i8; 16];
    for j in 0..16 {
        sc[j] = nearest_int(iscale * scales[j]).min(127) as i8;
    }
    for j in 0..16 {
        let dj = d.to_f32() * sc[j] as f32;
        if dj == 0.0 {
            continue;
        }
        for i in 0..16 {
            let q = nearest_int(x[16 * j + i] / dj).clamp(-32, 31);
            levels[16 * j + i] = (q + 32) as u8;
        }
    }
    let (ql, rest) = b.split_at_mut(128);
    let (qh, rest) = rest.split_at_mut(64);
    for (half, j) in [0usize, 128].into_iter().enumerate() {
        let (ql, qh) = (&mut ql[half * 64..], &mut qh[half * 32..]);
        for l in 0..32 {
            let q = |k: usize| levels[j + l + k];
            ql[l] = (q(0) & 0x0F) | ((q(64) & 0x0F) << 4);
            ql[l + 32] = (q(32) & 0x0F) | ((q(96) & 0x0F) << 4);
            qh[l] = (q(0) >> 4) | ((q(32) >> 4) << 2) | ((q(64) >> 4) << 4) | ((q(96) >> 4) << 6);
        }
    }
    for (o, s) in rest[..16].iter_mut().zip(sc) {
        *o = s as u8;
    }
    rest[16..18].copy_from_slice(&d.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_le_bytes()
    }

    #[test]
    fn q4_0_and_q4_1_follow_the_ggml_layout() {
        let mut b = vec![];
        b.extend(h(0.5));
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let mut out = [0.0f32; 32];
        dequantize_block(GgmlType::Q4_0, &b, &mut out);
        assert_eq!(out[0], -4.0); // (0 - 8) * 0.5
        assert_eq!(out[15], 3.5); // (15 - 8) * 0.5
        assert_eq!(out[16], 3.5); // high nibble of byte 0 is 15
        assert_eq!(out[31], -4.0);

        let mut b = vec![];
        b.extend(h(0.25));
        b.extend(h(-1.0));
        b.extend((0..16u8).map(|j| j | (j << 4)));
        dequantize_block(GgmlType::Q4_1, &b, &mut out);
        for j in 0..16 {
            assert_eq!(out[j], j as f32 * 0.25 - 1.0);
            assert_eq!(out[j + 16], j as f32 * 0.25 - 1.0);
        }
    }

    #[test]
    fn q8_0_is_signed_bytes_times_scale() {
        let mut b = vec![];
        b.extend(h(2.0));
        b.extend((0..32).map(|j| (j as i8 - 16) as u8));
        let mut out = [0.0f32; 32];
        dequantize_block(GgmlType::Q8_0, &b, &mut out);
        for (j, v) in out.iter().enumerate() {
            assert_eq!(*v, (j as f32 - 16.0) * 2.0);
        }
    }

    #[test]
    fn encoders_round_trip_within_their_precision() {
        // Values like a weight matrix's (one row with a larger outlier), several blocks.
        let x: Vec<f32> = (0..1024)
            .map(|i| ((i as f32 * 0.731).sin() * 0.05) + if i == 77 { 0.4 } else { 0.0 })
            .collect();
        let rms = (x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32).sqrt();
        for (ty, tolerance) in [
            (GgmlType::F32, 0.0),
            (GgmlType::F16, 1e-3),
            (GgmlType::BF16, 5e-3),
            (GgmlType::Q8_0, 0.01),
            (GgmlType::Q6K, 0.03),
            (GgmlType::Q4K, 0.12),
            (GgmlType::Q4_0, 0.15),
        ] {
            let back = dequantize(ty, &quantize(ty, &x));
            let err = (x
                .iter()
                .zip(&back)
                .map(|(a, b)| (a - b).powi(2))
                .sum::<f32>()
                / x.len() as f32)
                .sqrt();
            assert!(
                err <= tolerance * rms,
                "{ty:?}: rms error {err} vs rms {rms}"
            );
            assert_eq!(GgmlType::from_id(ty.id()), Some(ty));
        }
        // Zeros stay zeros.
        for ty in [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4K, GgmlType::Q6K] {
            assert!(dequantize(ty, &quantize(ty, &[0.0; 256]))
                .iter()
                .all(|&v| v == 0.0));
        }
    }

    #[test]
    fn sizes_match_ggml() {
        for (id, bs, bb) in [
            (0, 1, 4),
            (1, 1, 2),
            (2, 32, 18),
            (3, 32, 20),
            (6, 32, 22),
            (7, 32, 24),
            (8, 32, 34),
            (12, 256, 144),
            (13, 256, 176),
            (14, 256, 210),
            (30, 1, 2),
        ] {
            let t = GgmlType::from_id(id).unwrap();
            assert_eq!((t.block_size(), t.block_bytes()), (bs, bb), "{t:?}");
        }
        assert!(GgmlType::from_id(10).is_none());
    }
}
