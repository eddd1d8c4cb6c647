//! Offsets for buffers whose lifetimes are fixed: the dynamic storage allocation problem.
//!
//! Given closed step intervals and sizes, put every buffer at an offset so that no two buffers
//! live at a common step share a byte, keeping the highest end (the arena) small. The max-live
//! bound (the most bytes live at one step) is a floor no placement beats; finding the optimum is
//! NP-hard, so, as XLA's heap simulator does, several greedy heuristics run and the smallest
//! arena wins ([`Placement`]). Each one is a few milliseconds on a full training graph, a
//! heuristic stops as soon as it exceeds the best arena found so far, and the search stops when
//! one reaches the bound.
//!
//! Why several: on inference graphs and plain training graphs greedy-by-size best fit is within
//! 1% of the bound, but on checkpointed training graphs it is up to 40% above it. There, large
//! short-lived buffers (attention logits recomputed in the backward pass, the workspace of the
//! relative-position bias) get placed first, at the bottom, each at its own time; the small
//! long-lived buffers (the saved block inputs, the parameter gradients) then have to sit above
//! the union of every large buffer they overlap in time, leaving holes under them at every other
//! step. Two orders fix that in different graphs: the skyline fills the arena bottom-up with
//! long-lived buffers first (the "background"), the size-class order keeps large buffers first
//! but places the longer-lived ones of a size class (a gradient accumulated across blocks) before
//! the spikes that come and go around them.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::Buffer;

/// A placement heuristic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Placement {
    /// Lowest offset first: repeatedly place, of all unplaced buffers, the one that can go
    /// lowest above what is placed at its steps (the arena's "skyline" over its lifetime),
    /// ties to the largest area (bytes x steps), then the longest lifetime. The arena grows
    /// bottom-up like a strip packing, long-lived buffers settling first. (Sekiyama et al.,
    /// "Profile-guided memory optimization for deep neural networks", 2018, best-fit heuristic.)
    Skyline,
    /// Greedy by size best fit, TFLite's and XLA's default: buffers in decreasing size order,
    /// each in the smallest gap between placed buffers that live alongside it, or above them.
    BestFitBySize,
    /// Buffers by power-of-two size class (largest first), then longest lifetime, then size,
    /// each at the lowest offset where it fits.
    FirstFitBySizeClass,
}

impl Placement {
    /// Every heuristic, in the order they are tried (on equal arenas the first one wins).
    pub const ALL: [Placement; 3] = [
        Placement::Skyline,
        Placement::BestFitBySize,
        Placement::FirstFitBySizeClass,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Placement::Skyline => "skyline",
            Placement::BestFitBySize => "best-fit-by-size",
            Placement::FirstFitBySizeClass => "first-fit-by-size-class",
        }
    }
}

/// Places `buffers` with every heuristic of `strategies` and keeps the smallest arena (the
/// first strategy wins ties); stops early when an arena reaches `floor` (no placement can beat
/// it). Sets every buffer's offset; returns the arena size and the heuristic that produced it.
/// `strategies` must not be empty.
pub(crate) fn place(buffers: &mut [Buffer], strategies: &[Placement], floor: usize) -> (usize, Placement) {
    let mut best: Option<(usize, Placement, Vec<usize>)> = None;
    for &strategy in strategies {
        let limit = best.as_ref().map_or(usize::MAX, |b| b.0);
        let Some((arena, offsets)) = run(buffers, strategy, limit) else {
            continue; // exceeded the best arena so far
        };
        if best.as_ref().is_none_or(|b| arena < b.0) {
            let done = arena <= floor;
            best = Some((arena, strategy, offsets));
            if done {
                break;
            }
        }
    }
    let (arena, strategy, offsets) = best.expect("at least one placement strategy");
    for (b, o) in buffers.iter_mut().zip(offsets) {
        b.offset = o;
    }
    (arena, strategy)
}

/// One heuristic's offsets and arena, or `None` once its arena exceeds `limit`.
fn run(buffers: &[Buffer], strategy: Placement, limit: usize) -> Option<(usize, Vec<usize>)> {
    let n = buffers.len();
    let life = |i: usize| buffers[i].last - buffers[i].first + 1;
    match strategy {
        Placement::Skyline => skyline(buffers, limit),
        Placement::BestFitBySize => {
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by_key(|&i| (Reverse(buffers[i].size), i));
            in_order(buffers, &order, Fit::Best, limit)
        }
        Placement::FirstFitBySizeClass => {
            let class = |i: usize| usize::BITS - buffers[i].size.leading_zeros();
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by_key(|&i| (Reverse(class(i)), Reverse(life(i)), Reverse(buffers[i].size), i));
            in_order(buffers, &order, Fit::First, limit)
        }
    }
}

/// Which gap a buffer placed in order takes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fit {
    /// The lowest gap it fits in.
    First,
    /// The smallest gap it fits in.
    Best,
}

/// Places the buffers one by one in `order`, each in a gap between the placed buffers that
/// live alongside it (or above all of them).
fn in_order(buffers: &[Buffer], order: &[usize], fit: Fit, limit: usize) -> Option<(usize, Vec<usize>)> {
    let mut offsets = vec![0; buffers.len()];
    // Placed buffers sorted by offset, so the gaps between the ones that live alongside a new
    // buffer come out of one ascending scan.
    let mut placed: Vec<usize> = Vec::with_capacity(buffers.len());
    let mut arena = 0;
    for &i in order {
        let b = &buffers[i];
        let mut chosen: Option<(usize, usize)> = None; // (gap size, offset)
        let mut cursor = 0; // end of the highest overlapping buffer below the scan position
        if b.size > 0 {
            for &j in &placed {
                let p = &buffers[j];
                if p.size == 0 || !p.lives_with(b) {
                    continue;
                }
                if offsets[j] >= cursor + b.size {
                    let gap = offsets[j] - cursor;
                    if chosen.is_none_or(|(g, _)| gap < g) {
                        chosen = Some((gap, cursor));
                    }
                    if fit == Fit::First {
                        break;
                    }
                }
                cursor = cursor.max(offsets[j] + p.size);
            }
        }
        let offset = chosen.map_or(cursor, |(_, o)| o);
        offsets[i] = offset;
        arena = arena.max(offset + b.size);
        if arena > limit {
            return None;
        }
        let at = placed.partition_point(|&j| offsets[j] <= offset);
        placed.insert(at, i);
    }
    Some((arena, offsets))
}

/// [`Placement::Skyline`].
///
/// Every buffer is placed at or above the previous one's offset (the lowest possible offset of
/// an unplaced buffer only grows as others are placed, and the lowest one is taken each time),
/// so what is placed at a step, seen from the current level up, is one contiguous run: the
/// lowest offset a buffer can take is the highest "skyline" (top of what is placed) over its
/// lifetime. A segment tree keeps the skyline (range max; range assign when a buffer is placed,
/// since it goes above everything at its steps), and a heap keeps the buffers by their last
/// known lowest offset, a lower bound of the current one: a popped buffer whose offset has
/// risen goes back with the new one.
fn skyline(buffers: &[Buffer], limit: usize) -> Option<(usize, Vec<usize>)> {
    let steps = buffers.iter().map(|b| b.last + 1).max().unwrap_or(0);
    let mut sky = Skyline::new(steps);
    let mut offsets = vec![0; buffers.len()];
    // Max-heap on (lowest first, largest area, longest lifetime, definition order).
    let mut heap: BinaryHeap<(Reverse<usize>, u128, usize, Reverse<usize>)> = buffers
        .iter()
        .enumerate()
        .filter(|(_, b)| b.size > 0)
        .map(|(i, b)| {
            let life = b.last - b.first + 1;
            (Reverse(0), b.size as u128 * life as u128, life, Reverse(i))
        })
        .collect();
    let mut arena = 0;
    while let Some((Reverse(known), area, life, Reverse(i))) = heap.pop() {
        let b = &buffers[i];
        let lowest = sky.max(b.first, b.last);
        if lowest != known {
            heap.push((Reverse(lowest), area, life, Reverse(i)));
            continue;
        }
        offsets[i] = lowest;
        arena = arena.max(lowest + b.size);
        if arena > limit {
            return None;
        }
        sky.assign(b.first, b.last, lowest + b.size);
    }
    Some((arena, offsets))
}

/// The top of the placed buffers at each step: a segment tree with range assignment and range
/// maximum over `0..steps`.
struct Skyline {
    leaves: usize,
    max: Vec<usize>,
    /// A pending assignment of the whole node's range, not yet pushed to its children.
    pending: Vec<Option<usize>>,
}

impl Skyline {
    fn new(steps: usize) -> Self {
        let leaves = steps.max(1).next_power_of_two();
        Skyline {
            leaves,
            max: vec![0; 2 * leaves],
            pending: vec![None; 2 * leaves],
        }
    }

    /// The highest top over steps `first..=last`.
    fn max(&mut self, first: usize, last: usize) -> usize {
        self.query(1, 0, self.leaves - 1, first, last)
    }

    /// Sets the top of steps `first..=last` to `top`.
    fn assign(&mut self, first: usize, last: usize, top: usize) {
        self.update(1, 0, self.leaves - 1, first, last, top);
    }

    fn push_down(&mut self, node: usize) {
        if let Some(v) = self.pending[node].take() {
            for child in [2 * node, 2 * node + 1] {
                self.max[child] = v;
                self.pending[child] = Some(v);
            }
        }
    }

    fn query(&mut self, node: usize, lo: usize, hi: usize, first: usize, last: usize) -> usize {
        if last < lo || hi < first {
            return 0;
        }
        if first <= lo && hi <= last {
            return self.max[node];
        }
        self.push_down(node);
        let mid = (lo + hi) / 2;
        let left = self.query(2 * node, lo, mid, first, last);
        left.max(self.query(2 * node + 1, mid + 1, hi, first, last))
    }

    fn update(&mut self, node: usize, lo: usize, hi: usize, first: usize, last: usize, top: usize) {
        if last < lo || hi < first {
            return;
        }
        if first <= lo && hi <= last {
            self.max[node] = top;
            self.pending[node] = Some(top);
            return;
        }
        self.push_down(node);
        let mid = (lo + hi) / 2;
        self.update(2 * node, lo, mid, first, last, top);
        self.update(2 * node + 1, mid + 1, hi, first, last, top);
        self.max[node] = self.max[2 * node].max(self.max[2 * node + 1]);
    }
}
