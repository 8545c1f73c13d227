DROP TABLE round_cards;
