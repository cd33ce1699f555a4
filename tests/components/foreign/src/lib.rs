//! A well-formed component of a world that is neither Ballot's `policy`
//! nor its `protocol`: `ballot component push` must say so and refuse it.
#![cfg(target_arch = "wasm32")]

wit_bindgen::generate!({
    inline: "
        package test:foreign;

        world foreign {
            export ping: func() -> u32;
        }
    ",
});

struct Foreign;

impl Guest for Foreign {
    fn ping() -> u32 {
        7
    }
}

export!(Foreign);
