//! Rendezvous (highest random weight) hashing: while Redis is away, every
//! proxy that sees the same servers places a new match on the same one,
//! without talking to the others. Weights bias the choice (Thaler & Ravishankar's
//! logarithmic method), and removing a server only moves its own matches.

/// FNV-1a, then a SplitMix64 finalizer: stable across processes, builds
/// and platforms (std's hashers are not).
fn hash(match_id: &str, server_id: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in match_id
        .bytes()
        .chain(std::iter::once(0xff))
        .chain(server_id.bytes())
    {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The score of `server` for `match_id`; the highest wins.
pub fn score(match_id: &str, server_id: &str, weight: u32) -> f64 {
    // a uniform number in (0, 1), never 0 or 1
    let u = ((hash(match_id, server_id) >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    -(weight.max(1) as f64) / u.ln()
}

/// Index of the winning candidate among `(server id, weight)`.
pub fn choose<'a>(
    match_id: &str,
    candidates: impl Iterator<Item = (usize, &'a str, u32)>,
) -> Option<usize> {
    candidates
        .map(|(i, id, w)| (i, score(match_id, id, w)))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pick(m: &str, servers: &[&str]) -> usize {
        choose(m, servers.iter().enumerate().map(|(i, s)| (i, *s, 1))).unwrap()
    }

    #[test]
    fn stable_spread_and_minimal_movement() {
        let three = ["a", "b", "c"];
        let mut counts = [0; 3];
        for m in 0..3000 {
            let id = m.to_string();
            let i = pick(&id, &three);
            assert_eq!(i, pick(&id, &three), "deterministic");
            counts[i] += 1;
            // dropping another server never moves this match
            let others: Vec<&str> = three.iter().copied().filter(|s| *s != three[i]).collect();
            let without = [three[i], others[0]];
            assert_eq!(without[pick(&id, &without)], three[i]);
        }
        assert!(
            counts.iter().all(|&c| (850..1150).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn weights_bias_the_choice() {
        let mut heavy = 0;
        for m in 0..3000 {
            let id = m.to_string();
            let c = [(0, "a", 3), (1, "b", 1)];
            if choose(&id, c.into_iter()) == Some(0) {
                heavy += 1;
            }
        }
        assert!((2000..2500).contains(&heavy), "{heavy}");
    }
}
