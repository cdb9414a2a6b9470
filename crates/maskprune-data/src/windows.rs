//! Non-overlapping fixed-length windows over a token stream (the tail is dropped).

/// Cuts `tokens` into windows of `seq_len` tokens, at most `max_windows` of them.
pub fn windows(tokens: &[u32], seq_len: usize, max_windows: Option<usize>) -> Vec<&[u32]> {
    if seq_len == 0 {
        return Vec::new();
    }
    let n = tokens.len() / seq_len;
    let n = max_windows.map_or(n, |m| m.min(n));
    (0..n)
        .map(|i| &tokens[i * seq_len..(i + 1) * seq_len])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_the_tail_and_respects_the_limit() {
        let t: Vec<u32> = (0..10).collect();
        assert_eq!(
            windows(&t, 4, None),
            vec![&[0, 1, 2, 3][..], &[4, 5, 6, 7][..]]
        );
        assert_eq!(windows(&t, 4, Some(1)).len(), 1);
        assert_eq!(windows(&t, 11, None).len(), 0);
        assert_eq!(windows(&t, 0, None).len(), 0);
    }
}
