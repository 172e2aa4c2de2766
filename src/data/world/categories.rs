//! The world's object categories: names (singular, plural, synonyms), typical colour,
//! what each is for (attributes the instructions reason about), size and how many
//! instances a scene may hold.  How each one is drawn lives in `render.rs`.

/// What an object is for: the affordances and properties that the function/attribute
/// instructions ask about ("I lack vitamins, what should I eat?").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Attr {
    /// Food rich in vitamins (fruit and vegetables).
    Vitamins,
    /// Anything edible.
    Food,
    /// Something sweet to eat.
    Sweet,
    /// A utensil for eating.
    EatUtensil,
    /// Something that cuts.
    Cut,
    /// Something to drink from.
    Drink,
    /// Something food is put on or in.
    HoldFood,
    /// A light source.
    Light,
    /// Seating.
    Seat,
    /// A musical instrument.
    Music,
    /// Something to type or write an email with.
    Type,
    /// Something to read.
    Read,
    /// Something that tells the time.
    Time,
    /// A pet.
    Pet,
    /// A living plant that needs water.
    Water,
    /// A screen to watch a film on.
    Watch,
    /// Something soft to rest one's head on.
    Rest,
    /// Something to make a phone call with.
    Call,
}

/// All attributes, in a fixed order.
pub const ALL_ATTRS: [Attr; 18] = [
    Attr::Vitamins,
    Attr::Food,
    Attr::Sweet,
    Attr::EatUtensil,
    Attr::Cut,
    Attr::Drink,
    Attr::HoldFood,
    Attr::Light,
    Attr::Seat,
    Attr::Music,
    Attr::Type,
    Attr::Read,
    Attr::Time,
    Attr::Pet,
    Attr::Water,
    Attr::Watch,
    Attr::Rest,
    Attr::Call,
];

/// A colour with the word the answers use for it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Colour {
    /// The word the answers use ("red").
    pub word: &'static str,
    /// Base colour before jitter and lighting, 0..=255 per channel.
    pub rgb: [u8; 3],
}

const fn c(word: &'static str, r: u8, g: u8, b: u8) -> Colour {
    Colour {
        word,
        rgb: [r, g, b],
    }
}

/// `red`, RGB (200, 30, 35).
pub const RED: Colour = c("red", 200, 30, 35);
/// `yellow`, RGB (235, 205, 40).
pub const YELLOW: Colour = c("yellow", 235, 205, 40);
/// `orange`, RGB (240, 130, 20).
pub const ORANGE: Colour = c("orange", 240, 130, 20);
/// `green`, RGB (50, 150, 50).
pub const GREEN: Colour = c("green", 50, 150, 50);
/// `brown`, RGB (130, 80, 40).
pub const BROWN: Colour = c("brown", 130, 80, 40);
/// `white`, RGB (238, 236, 230).
pub const WHITE: Colour = c("white", 238, 236, 230);
/// `black`, RGB (30, 30, 34).
pub const BLACK: Colour = c("black", 30, 30, 34);
/// `grey`, RGB (140, 140, 145).
pub const GREY: Colour = c("grey", 140, 140, 145);
/// `silver`, RGB (195, 198, 205).
pub const SILVER: Colour = c("silver", 195, 198, 205);
/// `blue`, RGB (40, 80, 190).
pub const BLUE: Colour = c("blue", 40, 80, 190);
/// `pink`, RGB (235, 140, 170).
pub const PINK: Colour = c("pink", 235, 140, 170);
/// `purple`, RGB (120, 50, 150).
pub const PURPLE: Colour = c("purple", 120, 50, 150);

/// One object category.
#[derive(Debug)]
pub struct Category {
    /// Singular name, the canonical one ("apple"); also the MUSE `category_name`.
    pub name: &'static str,
    /// Plural name ("apples").
    pub plural: &'static str,
    /// Other words that name the same object (for the CHAIR vocabulary and the corrector).
    pub synonyms: &'static [&'static str],
    /// Colours an instance may have (one is drawn per instance).
    pub colours: &'static [Colour],
    /// What the object is for: the attributes function instructions ask about.
    pub attrs: &'static [Attr],
    /// Nominal size as a fraction of the image's smaller side.
    pub size: f32,
    /// The most instances a scene holds.
    pub max_count: u8,
}

impl Category {
    /// Whether the category has attribute `a`.
    pub fn has(&self, a: Attr) -> bool {
        self.attrs.contains(&a)
    }
    /// Singular or plural name for `n` instances.
    pub fn noun(&self, n: usize) -> &'static str {
        if n == 1 {
            self.name
        } else {
            self.plural
        }
    }
}

use Attr::*;

macro_rules! cat {
    ($name:expr, $pl:expr, [$($syn:expr),*], [$($col:expr),+], [$($a:expr),*], $size:expr, $max:expr) => {
        Category {
            name: $name,
            plural: $pl,
            synonyms: &[$($syn),*],
            colours: &[$($col),+],
            attrs: &[$($a),*],
            size: $size,
            max_count: $max,
        }
    };
}

/// Every category of the world.  Indices into this table are the category ids.
pub static CATEGORIES: [Category; 33] = [
    cat!(
        "apple",
        "apples",
        [],
        [RED, GREEN],
        [Vitamins, Food, Sweet],
        0.15,
        3
    ),
    cat!(
        "banana",
        "bananas",
        [],
        [YELLOW],
        [Vitamins, Food, Sweet],
        0.22,
        2
    ),
    cat!(
        "orange",
        "oranges",
        ["tangerine", "tangerines"],
        [ORANGE],
        [Vitamins, Food],
        0.15,
        3
    ),
    cat!("carrot", "carrots", [], [ORANGE], [Vitamins, Food], 0.24, 3),
    cat!(
        "broccoli",
        "broccolis",
        [],
        [GREEN],
        [Vitamins, Food],
        0.2,
        2
    ),
    cat!(
        "cake",
        "cakes",
        ["cupcake", "cupcakes"],
        [PINK, WHITE, BROWN],
        [Food, Sweet],
        0.2,
        1
    ),
    cat!(
        "bread",
        "breads",
        ["loaf", "loaves"],
        [BROWN],
        [Food],
        0.22,
        1
    ),
    cat!("fork", "forks", [], [SILVER], [EatUtensil], 0.26, 2),
    cat!("knife", "knives", [], [SILVER], [Cut], 0.28, 2),
    cat!(
        "spoon",
        "spoons",
        ["teaspoon", "teaspoons"],
        [SILVER],
        [EatUtensil],
        0.25,
        2
    ),
    cat!(
        "cup",
        "cups",
        ["mug", "mugs"],
        [WHITE, RED, BLUE, YELLOW],
        [Drink],
        0.17,
        3
    ),
    cat!(
        "plate",
        "plates",
        ["dish", "dishes"],
        [WHITE],
        [HoldFood],
        0.3,
        2
    ),
    cat!("bowl", "bowls", [], [BLUE, WHITE, RED], [HoldFood], 0.22, 2),
    cat!("bottle", "bottles", [], [GREEN, BLUE], [Drink], 0.3, 2),
    cat!(
        "laptop",
        "laptops",
        ["notebook", "notebooks"],
        [GREY, BLACK],
        [Type, Watch],
        0.36,
        1
    ),
    cat!("mouse", "mice", [], [BLACK, GREY, WHITE], [], 0.12, 1),
    cat!("keyboard", "keyboards", [], [BLACK, WHITE], [Type], 0.22, 1),
    cat!(
        "book",
        "books",
        ["novel", "novels"],
        [RED, BLUE, GREEN, PURPLE],
        [Read],
        0.2,
        3
    ),
    cat!("lamp", "lamps", [], [YELLOW, WHITE], [Light], 0.4, 1),
    cat!(
        "phone",
        "phones",
        ["smartphone", "smartphones", "cellphone", "cellphones"],
        [BLACK],
        [Time, Call],
        0.16,
        1
    ),
    cat!("clock", "clocks", [], [WHITE], [Time], 0.2, 1),
    cat!("candle", "candles", [], [WHITE, RED], [Light], 0.2, 3),
    cat!(
        "chair",
        "chairs",
        ["stool", "stools"],
        [BROWN],
        [Seat],
        0.46,
        2
    ),
    cat!(
        "couch",
        "couches",
        ["sofa", "sofas"],
        [RED, BLUE, GREEN, GREY],
        [Seat, Rest],
        0.5,
        1
    ),
    cat!(
        "tv",
        "tvs",
        ["television", "televisions"],
        [BLACK],
        [Watch],
        0.4,
        1
    ),
    cat!(
        "plant",
        "plants",
        ["houseplant", "houseplants"],
        [GREEN],
        [Water],
        0.34,
        2
    ),
    cat!("vase", "vases", [], [BLUE, WHITE, PURPLE], [], 0.26, 1),
    cat!(
        "cat",
        "cats",
        ["kitten", "kittens"],
        [ORANGE, GREY, BLACK],
        [Pet],
        0.26,
        1
    ),
    cat!(
        "dog",
        "dogs",
        ["puppy", "puppies"],
        [BROWN, YELLOW],
        [Pet],
        0.32,
        1
    ),
    cat!(
        "violin",
        "violins",
        ["fiddle", "fiddles"],
        [BROWN],
        [Music],
        0.34,
        1
    ),
    cat!("guitar", "guitars", [], [ORANGE, BROWN], [Music], 0.5, 1),
    cat!("drum", "drums", [], [RED, BLUE], [Music], 0.28, 2),
    cat!(
        "pillow",
        "pillows",
        ["cushion", "cushions"],
        [PINK, WHITE, YELLOW, PURPLE],
        [Rest],
        0.2,
        2
    ),
];

/// Category id by singular name.
pub fn by_name(name: &str) -> Option<usize> {
    CATEGORIES.iter().position(|c| c.name == name)
}
