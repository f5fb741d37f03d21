//! Who should own what: a balanced, sticky assignment computed by every worker from the same
//! snapshot (the live members and the current lease holders), so they agree without talking.

use std::collections::{BTreeMap, HashMap};

/// A live worker and its weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub id: String,
    pub capacity: u32,
}

/// Each member's share of `total` instances, proportional to its capacity; the remainder goes
/// one by one to the largest fractions (ties in member order). Equal capacities give shares
/// that differ by at most one.
pub fn quotas(members: &[Member], total: usize) -> Vec<usize> {
    let weight: u64 = members.iter().map(|m| u64::from(m.capacity.max(1))).sum();
    if weight == 0 {
        return vec![];
    }
    let exact: Vec<(usize, u64)> = members
        .iter()
        .map(|m| {
            let share = total as u64 * u64::from(m.capacity.max(1));
            ((share / weight) as usize, share % weight)
        })
        .collect();
    let mut quotas: Vec<usize> = exact.iter().map(|(q, _)| *q).collect();
    let left = total - quotas.iter().sum::<usize>();
    let mut order: Vec<usize> = (0..members.len()).collect();
    order.sort_by(|a, b| exact[*b].1.cmp(&exact[*a].1).then(a.cmp(b)));
    for i in order.into_iter().take(left) {
        quotas[i] += 1;
    }
    quotas
}

/// The instances each member should own. An instance stays with its current owner while that
/// owner is live and within its quota (instances in name order), so a change moves only what
/// it must; the rest go to the members furthest below their quota.
pub fn assign<'a>(
    members: &[Member],
    instances: &'a [String],
    owners: &HashMap<&str, &str>,
) -> BTreeMap<String, Vec<&'a str>> {
    let mut members: Vec<Member> = members.to_vec();
    members.sort_by(|a, b| a.id.cmp(&b.id));
    let quotas = quotas(&members, instances.len());
    let index: HashMap<&str, usize> = members
        .iter()
        .enumerate()
        .map(|(i, m)| (m.id.as_str(), i))
        .collect();
    let mut owned: Vec<Vec<&str>> = vec![vec![]; members.len()];
    let mut sorted: Vec<&String> = instances.iter().collect();
    sorted.sort();
    let mut homeless = vec![];
    for instance in sorted {
        let keeper = owners
            .get(instance.as_str())
            .and_then(|owner| index.get(owner))
            .filter(|i| owned[**i].len() < quotas[**i]);
        match keeper {
            Some(&i) => owned[i].push(instance),
            None => homeless.push(instance),
        }
    }
    for instance in homeless {
        let roomiest = (0..members.len()).max_by_key(|i| {
            (
                quotas[*i] as isize - owned[*i].len() as isize,
                usize::MAX - i,
            )
        });
        if let Some(i) = roomiest {
            owned[i].push(instance);
        }
    }
    members
        .into_iter()
        .zip(owned)
        .map(|(m, owned)| (m.id, owned))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(ids: &[&str]) -> Vec<Member> {
        ids.iter()
            .map(|id| Member {
                id: (*id).into(),
                capacity: 1,
            })
            .collect()
    }

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("inst{i:02}")).collect()
    }

    fn owners_of<'a>(plan: &'a BTreeMap<String, Vec<&'a str>>) -> HashMap<&'a str, &'a str> {
        plan.iter()
            .flat_map(|(m, owned)| owned.iter().map(move |i| (*i, m.as_str())))
            .collect()
    }

    fn spread(plan: &BTreeMap<String, Vec<&str>>) -> usize {
        let counts: Vec<usize> = plan.values().map(Vec::len).collect();
        counts.iter().max().unwrap() - counts.iter().min().unwrap()
    }

    #[test]
    fn equal_members_differ_by_at_most_one() {
        let instances = names(61);
        for w in 1..=7 {
            let ids: Vec<String> = (0..w).map(|i| format!("w{i}")).collect();
            let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
            let plan = assign(&members(&ids), &instances, &HashMap::new());
            assert!(spread(&plan) <= 1, "{w} workers: {plan:?}");
            assert_eq!(plan.values().map(Vec::len).sum::<usize>(), 61);
        }
    }

    #[test]
    fn a_join_or_a_leave_moves_only_what_it_must() {
        let instances = names(60);
        let three = assign(&members(&["a", "b", "c"]), &instances, &HashMap::new());
        let owners = owners_of(&three);
        // A fourth joins: 15 each, so exactly 15 move, all to the newcomer.
        let four = assign(&members(&["a", "b", "c", "d"]), &instances, &owners);
        let after = owners_of(&four);
        let moved: Vec<_> = instances
            .iter()
            .filter(|i| owners[i.as_str()] != after[i.as_str()])
            .collect();
        assert_eq!(moved.len(), 15);
        assert!(moved.iter().all(|i| after[i.as_str()] == "d"));
        assert_eq!(spread(&four), 0);
        // "b" leaves: only its 15 move, and the rest stay where they were.
        let three_again = assign(&members(&["a", "c", "d"]), &instances, &after);
        let last = owners_of(&three_again);
        for i in &instances {
            if after[i.as_str()] != "b" {
                assert_eq!(after[i.as_str()], last[i.as_str()], "{i} moved");
            }
        }
        assert_eq!(spread(&three_again), 0);
    }

    #[test]
    fn capacity_weights_the_shares() {
        let mut weighted = members(&["big", "small"]);
        weighted[0].capacity = 3;
        assert_eq!(quotas(&weighted, 40), vec![30, 10]);
        assert_eq!(quotas(&weighted, 3), vec![2, 1]);
        let instances = names(40);
        let plan = assign(&weighted, &instances, &HashMap::new());
        assert_eq!(plan["big"].len(), 30);
        assert_eq!(plan["small"].len(), 10);
    }

    #[test]
    fn owners_that_are_gone_or_unknown_count_for_nothing() {
        let instances = names(4);
        let owners: HashMap<&str, &str> = [("inst00", "dead"), ("inst01", "a")].into();
        let plan = assign(&members(&["a", "b"]), &instances, &owners);
        assert!(plan["a"].contains(&"inst01"));
        assert_eq!(plan["a"].len(), 2);
        assert_eq!(plan["b"].len(), 2);
        assert!(assign(&[], &instances, &owners).is_empty());
    }
}
